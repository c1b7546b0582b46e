"""CFG parallelism recovers from any interruption: on 2 ranks (`cfg=2`) and on 4 (`cfg=2` x `ulysses=2`), with a
cache, a call interrupted at every step index or between a step's "cond" and "uncond" calls is followed by calls
that equal one process's output; a call without CFG (two-call or batched pipelines) runs correctly on every
rank instead of failing or diverging. Interruptions are symmetric (every rank raises at the same point, as a
callback or Ctrl-C under torchrun does); a failure on one rank alone inside a collective is out of scope."""

from __future__ import annotations

import pytest
import torch

import cachedit
from cachedit.adapters import adapter_for
from cachedit.testing.distributed import run_distributed
from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

from .interrupts import abort_at_call, interruptions

ATOL = 1e-5  # fp32 pipeline output, every rank against one process
STEPS = 4
CACHE = dict(residual_diff_threshold=100.0, warmup_steps=1, max_continuous_cached_steps=1)  # caches steps 1, 3
PROMPT, OTHER = "a photo of a cat", "a red monkey eating a burger"


def _kwargs(family: str, cfg: bool) -> dict:
    kwargs = tiny_call_kwargs(family, num_inference_steps=STEPS)
    if not cfg and family == "flux":
        kwargs.pop("negative_prompt"), kwargs.pop("true_cfg_scale")
    if not cfg and family == "sd3":
        kwargs["guidance_scale"] = 1.0  # no CFG: one call a step on a batch of one
    return kwargs


def _count_block_calls(pipe) -> list:
    calls = []
    adapter_for(pipe.transformer).blocks(pipe.transformer)[0].register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


def _interrupted_then_recovered(pipe, points) -> list:
    """For each interruption point: the interrupted call (another prompt) must raise; the output of the next."""
    outs = []
    for label, extra, error, call_index in points:
        try:
            with abort_at_call(pipe.transformer, call_index):
                pipe(prompt=OTHER, **_kwargs("flux", True), **extra)
            raise AssertionError(f"{label}: the interrupted call did not raise")
        except error:
            pass
        outs.append((label, pipe(prompt=PROMPT, **_kwargs("flux", True))[0]))
    return outs


def _two_ranks(rank, world):
    pipe = tiny_pipeline("flux")
    calls = _count_block_calls(pipe)
    cachedit.accelerate(pipe, device="cpu_ref", attention="torch_sdpa", parallel=dict(cfg=2), cache=CACHE)
    recovered = _interrupted_then_recovered(pipe, interruptions(STEPS, 2))
    no_cfg = pipe(prompt=PROMPT, **_kwargs("flux", False))[0]
    calls.clear()
    again = pipe(prompt=PROMPT, **_kwargs("flux", True))[0]
    split_calls = len(calls)
    contexts = cachedit.summary(pipe)["cache"]["transformer"]["stacks"][0]["contexts"]
    batched = tiny_pipeline("sd3")
    cachedit.accelerate(batched, device="cpu_ref", attention="torch_sdpa", parallel=dict(cfg=2), cache=CACHE)
    sd3 = {cfg: batched(prompt=PROMPT, **_kwargs("sd3", cfg))[0] for cfg in (False, True)}
    return dict(recovered=recovered, no_cfg=no_cfg, again=again, split_calls=split_calls,
                cached={name: c["cached_steps"] for name, c in contexts.items()}, sd3=sd3)


def _four_ranks(rank, world):
    pipe = tiny_pipeline("flux")
    cachedit.accelerate(pipe, device="cpu_ref", parallel=dict(cfg=2, ulysses=2), cache=CACHE)
    points = [p for p in interruptions(STEPS, 2) if p[3] in (None, 1, 4)]  # every step; between branches; a step's start
    return dict(recovered=_interrupted_then_recovered(pipe, points), no_cfg=pipe(prompt=PROMPT, **_kwargs("flux", False))[0])


def _one_process(family: str, cfg: bool, **accelerate) -> torch.Tensor:
    pipe = tiny_pipeline(family)
    cachedit.accelerate(pipe, device="cpu_ref", cache=CACHE, **accelerate)
    return pipe(prompt=PROMPT, **_kwargs(family, cfg))[0]


def _close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    diff = (got - expected).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs diff {diff:.3g} > {ATOL}"


@pytest.fixture(scope="module")
def references():
    exact = dict(attention="torch_sdpa")
    return {("flux", True): _one_process("flux", True, **exact), ("flux", False): _one_process("flux", False, **exact),
            ("sd3", True): _one_process("sd3", True, **exact), ("sd3", False): _one_process("sd3", False, **exact),
            "auto": _one_process("flux", True), "auto-no-cfg": _one_process("flux", False)}


def test_cfg2_on_two_ranks_recovers_from_every_interruption_and_runs_calls_without_cfg(references):
    ranks = run_distributed(_two_ranks, 2)
    for rank, r in enumerate(ranks):
        assert len(r["recovered"]) == STEPS + 2 * STEPS
        for label, out in r["recovered"]:
            _close(out, references["flux", True], f"rank {rank}, after an interruption at {label}")
        _close(r["no_cfg"], references["flux", False], f"rank {rank}, a call without CFG")
        _close(r["again"], references["flux", True], f"rank {rank}, CFG again after a call without it")
        for cfg in (False, True):
            _close(r["sd3"][cfg], references["sd3", cfg], f"rank {rank}, batched pipeline, cfg={cfg}")
    # Still parallel after all that: each rank computed its own branch only, but for the first step.
    assert [r["split_calls"] for r in ranks] == [STEPS + 1, STEPS + 1]
    assert ranks[0]["cached"] == {"cond": [1, 3]} and ranks[1]["cached"] == {"uncond": [1, 3]}


def test_cache_ulysses_cfg_on_four_ranks_interrupted_and_recovered(references):
    ranks = run_distributed(_four_ranks, 4)
    for rank, r in enumerate(ranks):
        assert [label for label, _ in r["recovered"]] == [f"step {k}" for k in range(STEPS)] + [
            "transformer call 1", "transformer call 4"]
        for label, out in r["recovered"]:
            _close(out, references["auto"], f"rank {rank}, after an interruption at {label}")
            assert torch.equal(out, dict(ranks[0]["recovered"])[label]), f"rank {rank} differs from rank 0"
        _close(r["no_cfg"], references["auto-no-cfg"], f"rank {rank}, a call without CFG")
