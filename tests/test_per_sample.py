"""Per-sample cache decisions (`CacheConfig(per_sample=True)`): a batch of different prompts gives the
images each prompt gives alone, on the tiny FLUX pipeline (random weights), the trained reference model,
batched CFG (SD3), on 2 gloo ranks and on 4 (CFG parallelism x Ulysses); batch-level decisions (the default) do not, where the samples'
decisions differ.

Tolerance: the plain, never-accelerated pipeline itself gives a batch within ~1e-6 of its single runs
(the kernels' batch size changes the float32 rounding), so per-sample batches are compared with the
single runs at ATOL = 1e-5 absolute on the [0, 1] output images.
"""

from __future__ import annotations

import pytest
import torch

import cachedit
from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

ATOL = 1e-5
PROMPTS = ["a photo of a cat", "a red monkey eating a burger", "a blue car"]
# Random weights: residual diffs ~0.3 per step, so this threshold caches some steps for some prompts only.
TINY_CACHE = dict(residual_diff_threshold=0.3, warmup_steps=1)
STEPS = 10


def _kwargs(family, seeds, steps=STEPS, **extra):
    kwargs = tiny_call_kwargs(family, num_inference_steps=steps)
    kwargs["generator"] = [torch.Generator().manual_seed(s) for s in seeds]  # one generator per sample
    return {**kwargs, **extra}


def _contexts(pipe):
    return cachedit.summary(pipe)["cache"]["transformer"]["stacks"][0]["contexts"]


def _singles_and_batch(family, cache, prompts=PROMPTS, **extra):
    """Each prompt alone (seed i), then all of them in one batch (generator i for sample i)."""
    pipe = tiny_pipeline(family)
    cachedit.accelerate(pipe, device="cpu_ref", cache=cache)
    singles, decisions = [], []
    for i, prompt in enumerate(prompts):
        singles.append(pipe(prompt=prompt, **_kwargs(family, [i], **extra))[0])
        decisions.append({n: r["cached_steps"] for n, r in _contexts(pipe).items()})
    batch = pipe(prompt=prompts, **_kwargs(family, range(len(prompts)), **extra))[0]
    return torch.cat(singles), batch, decisions, _contexts(pipe)


@pytest.mark.parametrize("settings", [dict(), dict(calibrator="taylorseer"),
                                      dict(Fn=0, policy="teacache", residual_diff_threshold=0.5, calibrator="foca")],
                         ids=["dbcache", "taylorseer", "teacache+foca"])
def test_batch_of_three_prompts_equals_three_single_runs(settings):
    cache = dict(TINY_CACHE, **settings)
    singles, batch, decisions, contexts = _singles_and_batch("flux", dict(cache, per_sample=True))
    assert len({str(d) for d in decisions}) > 1, "the prompts must decide differently, or nothing is tested"
    for name, report in contexts.items():  # each row of the batch decided as its prompt alone did
        assert [s["cached_steps"] for s in report["samples"]] == [d[name] for d in decisions]
    assert (batch - singles).abs().max().item() <= ATOL
    # Batch-level (the default) decides once for the batch: here the batch differs from the single runs.
    singles_b, batch_b, _, _ = _singles_and_batch("flux", cache)
    assert torch.allclose(singles_b, singles, atol=ATOL)  # one prompt alone: the two modes agree
    assert (batch_b - singles_b).abs().max().item() > 100 * ATOL


def test_num_images_per_prompt():
    pipe = tiny_pipeline("flux")
    cachedit.accelerate(pipe, device="cpu_ref", cache=dict(TINY_CACHE, per_sample=True))
    singles = torch.cat([pipe(prompt=PROMPTS[1], **_kwargs("flux", [i]))[0] for i in range(3)])
    batch = pipe(prompt=PROMPTS[1], num_images_per_prompt=3, **_kwargs("flux", range(3)))[0]
    assert (batch - singles).abs().max().item() <= ATOL


def test_one_sample_is_bitwise_the_batch_level_mode():
    """A batch of one: the same ops on the same values as batch-level mode, so the same bits."""
    outs = []
    for per_sample in (False, True):
        pipe = tiny_pipeline("flux")
        cachedit.accelerate(pipe, device="cpu_ref", cache=dict(TINY_CACHE, calibrator="taylorseer", per_sample=per_sample))
        outs.append(pipe(prompt=PROMPTS[2], **_kwargs("flux", [2]))[0])
        assert _contexts(pipe)["cond"]["cached_steps"]
    assert torch.equal(*outs)


def test_batched_cfg_decides_per_sample_of_each_branch():
    """SD3 runs CFG as one call on a batch of (uncond, cond): 3 prompts are 6 rows, each deciding alone."""
    cache = dict(residual_diff_threshold=0.3, warmup_steps=1, per_sample=True)
    singles, batch, decisions, contexts = _singles_and_batch("sd3", cache)
    ((_, report),) = contexts.items()
    assert len(report["samples"]) == 6
    assert len({str(s["cached_steps"]) for s in report["samples"]}) > 1, "rows must decide differently"
    assert (batch - singles).abs().max().item() <= ATOL


def test_reference_model_batch_equals_single_runs():
    from cachedit.testing.reference import digit_prompt, reference_call_kwargs, reference_pipeline

    digits = (4, 5, 7)  # with seeds 4, 5, 7 these cache other steps at this threshold (12 steps, true CFG)
    prompts = [digit_prompt(d) for d in digits]
    cache = dict(Fn=1, Bn=0, residual_diff_threshold=0.2, warmup_steps=2)

    def kwargs(seeds):
        kw = reference_call_kwargs(num_inference_steps=12)
        kw["generator"] = [torch.Generator().manual_seed(s) for s in seeds]
        return kw

    results = {}
    for per_sample in (True, False):
        pipe = reference_pipeline()
        cachedit.accelerate(pipe, device="cpu_ref", cache=dict(cache, per_sample=per_sample))
        singles, decisions = [], []
        for d, prompt in zip(digits, prompts):
            singles.append(pipe(prompt=prompt, **kwargs([d])).images)
            decisions.append(_contexts(pipe)["cond"]["cached_steps"])
        batch = pipe(prompt=prompts, **kwargs(digits)).images
        results[per_sample] = (torch.cat(singles), batch, decisions)
    singles, batch, decisions = results[True]
    assert len({str(d) for d in decisions}) > 1 and all(decisions), decisions
    assert (batch - singles).abs().max().item() <= ATOL
    singles_b, batch_b, _ = results[False]
    assert (batch_b - singles_b).abs().max().item() > 100 * ATOL


def test_per_sample_is_validated():
    with pytest.raises(ValueError, match=r"CacheConfig.per_sample='yes' is invalid; allowed values: False, True"):
        cachedit.CacheConfig(per_sample="yes")
    with pytest.raises(ValueError, match=r"CacheConfig.per_sample=True is invalid; allowed values: False when mode"):
        cachedit.CacheConfig(per_sample=True, mode="dbprune")


# ---------------------------------------------------------------------------------------------
# 2 gloo ranks, one spawn: Ulysses (each rank holds every sample, half of each sequence: the
# per-sample statistics are averaged over the ranks), CFG parallelism on batched CFG (each half
# holds other samples: their statistics are its own) and tensor parallelism.
# ---------------------------------------------------------------------------------------------

JOBS = [dict(family="flux", parallel=dict(ulysses=2)), dict(family="sd3", parallel=dict(cfg=2)),
        dict(family="flux", parallel=dict(tensor=2)),  # tensor peers hold the same rows: no reduce needed
        dict(family="flux", parallel=dict(cfg=2))]  # two-call CFG: each half runs one branch's states


def _on_rank(rank, world, jobs):
    import cachedit as cd
    from cachedit.testing.tiny import tiny_pipeline as tp

    out = []
    for job in jobs:
        pipe = tp(job["family"])
        cd.accelerate(pipe, device="cpu_ref", attention="torch_sdpa", parallel=job["parallel"],
                      cache=dict(TINY_CACHE, per_sample=True))
        image = pipe(prompt=PROMPTS, **_kwargs(job["family"], range(3)))[0]
        contexts = cd.summary(pipe)["cache"]["transformer"]["stacks"][0]["contexts"]
        out.append({"image": image, "decisions": {n: [s["cached_steps"] for s in r["samples"]]
                                                  for n, r in contexts.items()}})
        cd.disable(pipe)
    return out


def test_per_sample_on_two_ranks():
    from cachedit.testing.distributed import run_distributed

    expected = []
    for job in JOBS:
        pipe = tiny_pipeline(job["family"])
        cachedit.accelerate(pipe, device="cpu_ref", cache=dict(TINY_CACHE, per_sample=True))
        expected.append(pipe(prompt=PROMPTS, **_kwargs(job["family"], range(3)))[0])
    ranks = run_distributed(_on_rank, 2, args=(JOBS,))
    ulysses = [r[0] for r in ranks]
    assert ulysses[0]["decisions"] == ulysses[1]["decisions"], "every rank selects the same rows"
    assert len({str(d) for d in ulysses[0]["decisions"]["cond"]}) > 1
    for r in ranks:
        for job, got, want in zip(JOBS, r, expected):
            assert (got["image"] - want).abs().max().item() <= ATOL, job


# ---------------------------------------------------------------------------------------------
# 4 gloo ranks, one spawn: CFG parallelism x Ulysses (FLUX true CFG, two calls a step: each cfg
# half runs one branch's batch of 3, its 2 Ulysses ranks averaging each row's statistic).
# ---------------------------------------------------------------------------------------------

CFG_ULYSSES_STEPS = 6  # enough for the prompts' uncond rows to decide differently


def _cfg_ulysses_rank(rank, world):
    import cachedit as cd
    from cachedit.testing.tiny import tiny_pipeline as tp

    pipe = tp("flux")
    cd.accelerate(pipe, device="cpu_ref", attention="torch_sdpa", parallel=dict(cfg=2, ulysses=2),
                  cache=dict(TINY_CACHE, per_sample=True))
    image = pipe(prompt=PROMPTS, **_kwargs("flux", range(3), steps=CFG_ULYSSES_STEPS))[0]
    contexts = cd.summary(pipe)["cache"]["transformer"]["stacks"][0]["contexts"]
    return {"image": image, "decisions": {n: [s["cached_steps"] for s in r["samples"]] for n, r in contexts.items()}}


def test_per_sample_under_cfg_parallel_and_ulysses_equals_single_runs():
    from cachedit.testing.distributed import run_distributed

    pipe = tiny_pipeline("flux")
    cachedit.accelerate(pipe, device="cpu_ref", cache=dict(TINY_CACHE, per_sample=True))
    singles, decisions = [], {}
    for i, prompt in enumerate(PROMPTS):
        singles.append(pipe(prompt=prompt, **_kwargs("flux", [i], steps=CFG_ULYSSES_STEPS))[0])
        for name, report in _contexts(pipe).items():
            decisions.setdefault(name, []).append(report["cached_steps"])
    assert len({str(d) for d in decisions["uncond"]}) > 1, "the prompts must decide differently"
    ranks = run_distributed(_cfg_ulysses_rank, 4)
    for r in ranks:
        ((branch, rows),) = r["decisions"].items()  # each cfg half holds one branch's states
        assert rows == decisions[branch], branch
        assert (r["image"] - torch.cat(singles)).abs().max().item() <= ATOL
    assert {next(iter(r["decisions"])) for r in ranks} == {"cond", "uncond"}
