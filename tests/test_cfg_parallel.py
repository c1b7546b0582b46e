"""CFG parallelism on 2 gloo ranks: each rank runs one CFG branch; outputs equal one process."""

from __future__ import annotations

import pytest

import cachedit
from cachedit.testing.distributed import run_distributed
from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

FAMILIES = ["flux", "qwenimage", "wan", "sd3", "zimage"]  # two-call CFG (first three), batched CFG (last two)
STEPS = 3


def _on_rank(rank, world, family, cache):
    import cachedit as cd
    from cachedit.testing.tiny import tiny_call_kwargs as kw, tiny_pipeline as tp

    from cachedit.adapters import adapter_for

    pipe = tp(family)
    calls = []
    first = adapter_for(pipe.transformer).blocks(pipe.transformer)[0]
    first.register_forward_pre_hook(lambda *a: calls.append(1))  # only computed calls reach the blocks
    cd.accelerate(pipe, device="cpu_ref", attention="torch_sdpa", parallel=dict(cfg=2), cache=cache)
    out = pipe(prompt="a photo of a cat", **kw(family, num_inference_steps=STEPS))[0]
    return {"out": out, "calls": len(calls)}


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_parallel_matches_one_process(family):
    from cachedit.adapters import adapter_for

    pipe = tiny_pipeline(family)
    counted = []
    adapter_for(pipe.transformer).blocks(pipe.transformer)[0].register_forward_pre_hook(lambda *a: counted.append(1))
    expected = pipe(prompt="a photo of a cat", **tiny_call_kwargs(family, num_inference_steps=STEPS))[0]
    results = run_distributed(_on_rank, 2, args=(family, None))
    for r in results:
        assert (r["out"] - expected).abs().max().item() <= 1e-5, family
    # Each rank computes one branch: half the transformer work of one process.
    if len(counted) == 2 * STEPS:  # two calls per step
        assert all(r["calls"] == STEPS for r in results)


def test_cfg_parallel_with_cache():
    cache = dict(residual_diff_threshold=0.3, warmup_steps=1)
    pipe = tiny_pipeline("qwenimage")
    cachedit.accelerate(pipe, device="cpu_ref", attention="torch_sdpa", cache=cache)
    expected = pipe(prompt="a photo of a cat", **tiny_call_kwargs("qwenimage", num_inference_steps=STEPS))[0]
    results = run_distributed(_on_rank, 2, args=("qwenimage", cache))
    for r in results:
        assert (r["out"] - expected).abs().max().item() <= 1e-5


def test_cfg_parallel_needs_two_ranks():
    pipe = tiny_pipeline("qwenimage")
    with pytest.raises(ValueError, match="ParallelConfig.cfg=2 needs torch.distributed with world size 2"):
        cachedit.accelerate(pipe, device="cpu_ref", parallel=dict(cfg=2))
    assert cachedit.summary(pipe) == {"accelerated": False}
