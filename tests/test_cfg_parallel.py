"""CFG parallelism on 2 gloo ranks (each rank runs one CFG branch) and on 4 (each CFG half also splits
its branch context- or tensor-parallel); outputs equal one process."""

from __future__ import annotations

import pytest
import torch

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
    # Each rank computes one branch: half the transformer work of one process, but for the first step,
    # which every rank computes whole (it shows the call's CFG topology).
    if len(counted) == 2 * STEPS:  # two calls per step
        assert all(r["calls"] == STEPS + 1 for r in results)


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
    with pytest.raises(ValueError, match="parallel: cfg=2 needs torch.distributed initialised with world size 2"):
        cachedit.accelerate(pipe, device="cpu_ref", parallel=dict(cfg=2))
    assert cachedit.summary(pipe) == {"accelerated": False}


# ---------------------------------------------------------------------------------------------
# cfg=2 combined with context / tensor parallelism: one 4-rank spawn, each test checks its slice
# ---------------------------------------------------------------------------------------------

ATOL = 1e-5  # fp32 pipeline output, every rank against one process
# Cache case: threshold just above the statistic one process sees at the first step that may cache
# (`_calibrated`), so a rank deciding on anything but the reduced statistic would diverge.
CACHE = dict(warmup_steps=1, residual_diff_threshold="calibrated")
HYBRID = [
    dict(family="flux", parallel=dict(cfg=2, ulysses=2)),  # two-call (true) CFG
    dict(family="wan", parallel=dict(cfg=2, ulysses=2)),
    dict(family="qwenimage", parallel=dict(cfg=2, tensor=2)),
    dict(family="zimage", parallel=dict(cfg=2, ring=2)),  # batched CFG: each half splits its half batch
    dict(family="flux", parallel=dict(cfg=2, ulysses=2), cache=CACHE, steps=4),
    dict(family="qwenimage", parallel=dict(cfg=2, tensor=2), cache=CACHE, steps=4),
    # Batched CFG: each half's statistic (0.664 / 0.668 at step 1) straddles one process's (0.666) when
    # the threshold is only 0.1% above it, so the halves agree only through the cfg-group average.
    dict(family="zimage", parallel=dict(cfg=2, ring=2), cache=CACHE, steps=4, margin=1.001),
]
HYBRID_ERRORS = {  # each must be refused under a 4-rank group before the pipeline is touched
    "world_size": ("flux", dict(cfg=2, ulysses=4)),
    "batched_no_plan": ("sd3", dict(cfg=2, ulysses=2)),  # SD3 batched CFG has no context-parallel plan
}


def _run_job(pipe, job):
    return pipe(prompt="a photo of a cat", **tiny_call_kwargs(job["family"], num_inference_steps=job.get("steps",
                                                                                                      STEPS)))[0]


def _pattern(pipe):
    """Per CFG branch (cache context): the steps it cached."""
    report = cachedit.summary(pipe)["cache"]["transformer"]
    return {ctx: c["cached_steps"] for stack in report["stacks"] for ctx, c in stack["contexts"].items()}


def _calibrated(job):
    """`job` with its cache threshold `margin` (10%) above the largest relative change one process sees at
    the first step after warmup (so that step caches and later, larger changes compute)."""
    if not job.get("cache") or job["cache"]["residual_diff_threshold"] != "calibrated":
        return job
    pipe = tiny_pipeline(job["family"])
    cachedit.accelerate(pipe, device="cpu_ref", cache={**job["cache"], "residual_diff_threshold": 1e-9})
    _run_job(pipe, job)
    report = cachedit.summary(pipe)["cache"]["transformer"]
    first = [c["residual_diffs"][min(c["residual_diffs"])] for stack in report["stacks"]
             for c in stack["contexts"].values() if c["residual_diffs"]]
    return {**job, "cache": {**job["cache"], "residual_diff_threshold": job.get("margin", 1.1) * max(first)}}


def _hybrid_rank(rank, world, jobs):
    from cachedit.adapters import adapter_for

    out = []
    for job in jobs:
        pipe = tiny_pipeline(job["family"])
        calls = []
        adapter_for(pipe.transformer).blocks(pipe.transformer)[0].register_forward_pre_hook(lambda *a: calls.append(1))
        cachedit.accelerate(pipe, device="cpu_ref", parallel=job["parallel"], cache=job.get("cache"))
        images = _run_job(pipe, job)
        pattern = _pattern(pipe) if job.get("cache") else None
        cachedit.disable(pipe)
        restored = not any(getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks
                           for m in pipe.transformer.modules())  # cache_context may leave empty registries
        out.append(dict(images=images, calls=len(calls), pattern=pattern, restored=restored))
    errors = {}
    for name, (family, parallel) in HYBRID_ERRORS.items():
        pipe = tiny_pipeline(family)
        try:
            cachedit.accelerate(pipe, device="cpu_ref", parallel=parallel)
            errors[name] = "no error"
        except ValueError as exc:
            errors[name] = str(exc)
        hooked = [n for n, m in pipe.transformer.named_modules() if hasattr(m, "_diffusers_hook")]
        errors[name + ":untouched"] = not cachedit.is_accelerated(pipe) and not hooked
    return out, errors


@pytest.fixture(scope="module")
def hybrid():
    """(jobs as run, one-process outputs and cache patterns, per-rank results) of the one 4-rank spawn."""
    jobs = [_calibrated(job) for job in HYBRID]
    refs = []
    for job in jobs:
        pipe = tiny_pipeline(job["family"])
        cachedit.accelerate(pipe, device="cpu_ref", cache=job.get("cache"))  # the same kernels, one process
        refs.append((_run_job(pipe, job), _pattern(pipe) if job.get("cache") else None))
    return jobs, refs, run_distributed(_hybrid_rank, 4, args=(jobs,))


def _hybrid_id(job):
    return job["family"] + "-" + "x".join(f"{k}{v}" for k, v in job["parallel"].items()) + (
        "-cache" if job.get("cache") else "")


@pytest.mark.parametrize("index", range(len(HYBRID)), ids=[_hybrid_id(j) for j in HYBRID])
def test_cfg_hybrid_matches_one_process(hybrid, index):
    jobs, refs, ranks = hybrid
    expected, pattern = refs[index]
    for rank, (res, _) in enumerate(ranks):
        got = res[index]
        diff = (got["images"] - expected).abs().max().item()
        assert diff <= ATOL, f"rank {rank}: max abs diff {diff:.3g} > {ATOL}"
        assert torch.equal(got["images"], ranks[0][0][index]["images"]), f"rank {rank} differs from rank 0"
        assert got["restored"], f"rank {rank}: hooks left after cachedit.disable"
    if pattern is None:
        steps = jobs[index].get("steps", STEPS)
        if jobs[index]["family"] != "zimage":  # two calls per step: each half computes one branch (both at step 0)
            assert all(res[index]["calls"] == steps + 1 for res, _ in ranks)
        return
    # Each branch's cached steps are one process's, on every rank of the half that runs it.
    seen = {}
    for rank, (res, _) in enumerate(ranks):
        got = res[index]["pattern"]
        assert len(got) == 1 and all(got[ctx] == pattern[ctx] for ctx in got), f"rank {rank}: {got} vs {pattern}"
        seen.update(got)
    assert seen == pattern
    assert any(pattern.values()), f"the case caches nothing, so it tests nothing: {pattern}"


def test_cfg_hybrid_invalid_combinations(hybrid):
    for rank, (_, errors) in enumerate(hybrid[2]):
        assert errors["world_size"].startswith("parallel: ulysses=4 x cfg=2 needs world size 8, but torch.distributed "
                                               "has 4"), errors
        assert "no context-parallel plan for pipe.transformer (SD3Transformer2DModel)" in errors["batched_no_plan"]
        assert all(v for k, v in errors.items() if k.endswith(":untouched")), errors


def test_cfg_hybrid_needs_the_product_world_size():
    pipe = tiny_pipeline("qwenimage")
    with pytest.raises(ValueError, match=r"tensor=2 x cfg=2 needs torch.distributed initialised with world size 4"):
        cachedit.accelerate(pipe, device="cpu_ref", parallel=dict(cfg=2, tensor=2))
    with pytest.raises(ValueError, match=r"parallel: ulysses=2 x cfg=2 needs torch.distributed initialised with world "
                                         r"size 4"):
        cachedit.accelerate(pipe, device="cpu_ref", parallel=dict(cfg=2, ulysses=2))
    assert cachedit.summary(pipe) == {"accelerated": False}
