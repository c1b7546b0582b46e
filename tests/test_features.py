"""The feature pipeline itself: one declared order, checks before any change, rollback in reverse,
`is_accelerated` / `applied`, and a feature added as one module plus one list entry."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import cachedit
import cachedit.api as api
from cachedit.features import FEATURES, Applied, Context, Feature, ReducerChain
from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

CACHE = dict(residual_diff_threshold=0.3, warmup_steps=1)


def _run(pipe) -> torch.Tensor:
    return pipe("a cat", **tiny_call_kwargs("flux", num_inference_steps=3)).images


def _hooked(pipe) -> list[str]:
    """Modules carrying any hook (a plain pipeline call leaves an empty registry on the transformer)."""
    return [n for n, m in pipe.transformer.named_modules() if getattr(getattr(m, "_diffusers_hook", None), "hooks", {})]


class CallCounts(Feature):
    """The worked example of docs/architecture.md: counts transformer calls."""

    name = "call_counts"

    def wanted(self, ctx: Context) -> bool:
        return True

    def apply(self, ctx: Context) -> Applied:
        counts = Counter()
        record = Applied(self.name, parts={"counts": counts}, report=lambda: {"call_counts": dict(counts)})
        with record.building():
            for name, transformer in ctx.transformers().items():
                handle = transformer.register_forward_pre_hook(lambda *_, n=name: counts.update([n]))
                record.undo.append(handle.remove)
        return record

    def idle(self, ctx: Context) -> dict:
        return {"call_counts": None}


class Broken(Feature):
    """Applies half of itself, then fails."""

    name = "broken"

    def __init__(self, where: str) -> None:
        self.where, self.removed, self.seen = where, 0, []

    def check(self, ctx: Context) -> None:
        if self.where == "check":
            raise ValueError("Broken.where='check'")

    def wanted(self, ctx: Context) -> bool:
        return True

    def apply(self, ctx: Context) -> Applied:
        self.seen = [r.name for r in ctx.records]
        record = Applied(self.name)
        with record.building():
            record.undo.append(lambda: setattr(self, "removed", self.removed + 1))
            raise RuntimeError("broken half-way")


def test_the_declared_order_and_the_records():
    names = [f.name for f in FEATURES]
    assert names == ["fuse_qkv", "quantize", "attention", "signatures", "tensor_parallel", "compile", "cache",
                     "context_parallel", "cfg_parallel", "vae_parallel", "controlnet_parallel", "call_scope"]
    pipe = tiny_pipeline("flux")
    assert not cachedit.is_accelerated(pipe) and cachedit.applied(pipe) == {}
    cachedit.accelerate(pipe, device="cpu_ref", cache=CACHE, attention="math")
    assert cachedit.is_accelerated(pipe)
    assert list(cachedit.applied(pipe)) == ["attention", "signatures", "cache", "call_scope"]  # in the order applied
    cachedit.disable(pipe)
    assert not cachedit.is_accelerated(pipe) and cachedit.applied(pipe) == {}


def test_a_feature_is_one_module_and_one_list_entry(monkeypatch):
    pipe = tiny_pipeline("flux")
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    base = _run(pipe)
    handle.remove()
    monkeypatch.setattr(api, "FEATURES", (*FEATURES[:-1], CallCounts(), FEATURES[-1]))
    cachedit.accelerate(pipe, device="cpu_ref", cache=dict(residual_diff_threshold=0))
    assert cachedit.summary(pipe)["call_counts"] == {}
    assert torch.equal(_run(pipe), base)  # a cache that never skips: the same ops on the same inputs
    assert cachedit.summary(pipe)["call_counts"] == {"transformer": len(calls)} and len(calls) >= 3
    assert list(cachedit.applied(pipe))[-2:] == ["call_counts", "call_scope"]
    cachedit.disable(pipe)
    _run(pipe)
    assert not pipe.transformer._forward_pre_hooks


def test_a_failing_check_changes_nothing(monkeypatch):
    pipe = tiny_pipeline("flux")
    monkeypatch.setattr(api, "FEATURES", (*FEATURES, Broken("check")))
    with pytest.raises(ValueError, match="Broken.where='check'"):
        cachedit.accelerate(pipe, device="cpu_ref", cache=CACHE, attention="math")
    assert not cachedit.is_accelerated(pipe) and _hooked(pipe) == []


def test_a_failing_apply_is_rolled_back_in_reverse(monkeypatch):
    pipe = tiny_pipeline("flux")
    base = _run(pipe)
    broken = Broken("apply")
    monkeypatch.setattr(api, "FEATURES", (*FEATURES[:-1], broken, FEATURES[-1]))
    with pytest.raises(RuntimeError, match="broken half-way"):
        cachedit.accelerate(pipe, device="cpu_ref", cache=CACHE, attention="math", quantize=dict(scheme="int8"),
                           compile=dict(backend="eager", fuse_qkv=True))
    assert broken.seen == ["fuse_qkv", "quantize", "attention", "compile", "cache"]  # all applied when it failed
    assert broken.removed == 1  # its own half-applied part, undone by `building`
    assert not cachedit.is_accelerated(pipe) and _hooked(pipe) == [] and type(pipe).__name__ == "FluxPipeline"
    assert torch.equal(_run(pipe), base)


def test_the_reducer_chain_runs_its_stages_in_order():
    chain = ReducerChain()
    x = torch.tensor([1.0, 2.0])
    assert chain(x) is x  # no stage: one process decides alone
    first, second = (lambda s: s + 1), (lambda s: s * 10)
    chain.add(first)
    chain.add(second)
    assert torch.equal(chain(x), torch.tensor([20.0, 30.0]))
    chain.remove(first)
    assert torch.equal(chain(x), torch.tensor([10.0, 20.0]))
