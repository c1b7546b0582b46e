"""Per-call state has a lifecycle: a pipeline call interrupted anywhere (an exception or KeyboardInterrupt at
any step, or between the CFG branches of a step) leaves nothing behind, so the next call computes bit for bit
what a fresh accelerated pipeline computes (same code path, same inputs: equality holds by construction) and
`summary()` reports that call alone. The interception is instance-scoped and `disable` undoes it exactly."""

from __future__ import annotations

import inspect

import pytest
import torch

import cachedit
from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

from .interrupts import Abort, abort_at_call, interruptions, raise_at

STEPS = 4
EXACT = dict(device="cpu_ref", attention="torch_sdpa")
# Random weights: relative changes are ~0.2-0.5 per step, so this caches steps 1 and 3 (warmup 1, at most one
# skip in a row); TaylorSeer keeps a calibrator history across steps.
CACHE = dict(residual_diff_threshold=100.0, warmup_steps=1, max_continuous_cached_steps=1, calibrator="taylorseer")
CASES = {"cache": False, "cache+cfg": True}  # FLUX without / with true CFG (two named transformer calls a step)


def _kwargs(cfg: bool, steps: int = STEPS) -> dict:
    kwargs = tiny_call_kwargs("flux", num_inference_steps=steps)
    if not cfg:
        kwargs.pop("negative_prompt"), kwargs.pop("true_cfg_scale")
    return kwargs


def _contexts(pipe) -> dict:
    return cachedit.summary(pipe)["cache"]["transformer"]["stacks"][0]["contexts"]


def _live(pipe) -> int:
    """Cache states and memoised rotary outputs alive right now."""
    cached = cachedit.applied(pipe)["cache"].parts["transformer"]
    memos = [hook for _, hook in cached.memo]
    return sum(c.states.live() for c in cached.stacks) + sum(hook.last is not None for hook in memos)


@pytest.fixture(scope="module")
def fresh():
    """Per case: the output and cache report of a fresh accelerated pipeline's first call."""
    refs = {}
    for case, cfg in CASES.items():
        pipe = tiny_pipeline("flux")
        cachedit.accelerate(pipe, **EXACT, cache=CACHE)
        refs[case] = (pipe(prompt="a photo of a cat", **_kwargs(cfg))[0], _contexts(pipe))
        assert all(r["cached_steps"] == [1, 3] for r in refs[case][1].values()), refs[case][1]
    return refs


@pytest.mark.parametrize("case", CASES)
def test_next_call_after_an_interruption_at_every_step_matches_a_fresh_pipeline(case, fresh):
    cfg = CASES[case]
    expected, report = fresh[case]
    pipe = tiny_pipeline("flux")
    cachedit.accelerate(pipe, **EXACT, cache=CACHE)
    for label, extra, error, call_index in interruptions(STEPS, 2 if cfg else 1):
        with abort_at_call(pipe.transformer, call_index), pytest.raises(error):
            pipe(prompt="a red monkey eating a burger", **_kwargs(cfg), **extra)  # another prompt than the next
        assert _live(pipe) == 0, f"{case}, {label}: per-call state survived the interrupted call"
        out = pipe(prompt="a photo of a cat", **_kwargs(cfg))[0]
        assert torch.equal(out, expected), f"{case}, interrupted at {label}: the next call differs from a fresh one"
        assert _contexts(pipe) == report, f"{case}, interrupted at {label}"
        assert _live(pipe) == 0


def test_an_interrupted_call_reports_itself_and_the_next_one_alone():
    pipe = tiny_pipeline("flux")
    cachedit.accelerate(pipe, **EXACT, cache=CACHE)

    with pytest.raises(RuntimeError, match="client went away"):
        pipe(prompt="a dog", **_kwargs(True, steps=6), callback_on_step_end=raise_at(2, RuntimeError("client went away")))
    assert {r["steps"] for r in _contexts(pipe).values()} == {3}  # steps 0-2 ran, then the callback raised
    pipe(prompt="a dog", **_kwargs(True, steps=6))
    assert {r["steps"] for r in _contexts(pipe).values()} == {6}


def test_the_interception_is_instance_scoped_and_disable_restores_it_exactly():
    pipe, other = tiny_pipeline("flux"), tiny_pipeline("flux")
    cls = type(pipe)
    call, signature = cls.__call__, inspect.signature(pipe.__call__)
    plain = pipe(prompt="a photo of a cat", **_kwargs(True))[0]
    keys = set(vars(pipe))  # after a call: the pipeline sets its own per-call attributes
    cachedit.accelerate(pipe, **EXACT, cache=dict(CACHE, residual_diff_threshold=0))  # never skips
    assert isinstance(pipe, cls) and type(pipe).__name__ == cls.__name__ and type(pipe).__module__ == cls.__module__
    assert inspect.signature(pipe.__call__) == signature
    assert cls.__call__ is call and type(other) is cls, "a class was patched"
    with pytest.raises(Abort):  # a failing call, then one that must equal the plain pipeline
        pipe(prompt="a photo of a cat", **_kwargs(True), callback_on_step_end=raise_at(1, Abort()))
    assert torch.equal(pipe(prompt="a photo of a cat", **_kwargs(True))[0], plain)
    cachedit.disable(pipe)
    assert type(pipe) is cls and cls.__call__ is call and set(vars(pipe)) == keys
    assert torch.equal(pipe(prompt="a photo of a cat", **_kwargs(True))[0], plain)
