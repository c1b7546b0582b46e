"""Tensor parallelism (and hybrid context x tensor meshes, and text encoders) on 2 and 4 gloo ranks.

As in test_context_parallel.py, every distributed case runs inside one spawn per world size; each
test checks its own slice of the results.
"""

from __future__ import annotations

import pytest
import torch

import cachedit
from cachedit.parallel.tensor import text_encoders_of
from cachedit.testing.distributed import run_distributed
from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

PROMPT = "a photo of a cat"
STEPS = 2
ATOL = 1e-5  # fp32 pipeline output and prompt embeddings, every rank against one process
# Per-rank block weights differ from 1/N by what stays whole (q/k norms over head_dim, Wan's
# scale_shift_table and cross-attention norm) and the row-split biases only the first rank keeps.
# Measured on the tiny models: within 0.010 of 1/N (Wan at N=4: 0.257-0.260; FLUX rank 1 at N=2: 0.499).
BLOCK_ALLOWANCE = 0.02
# all-reduces and all-gathers per transformer call, from the model code (see parallel/tensor.py):
# FLUX 2 double blocks x (attention, ff, ff_context) + 2 single blocks x proj_out; gathers: AdaLN
# modulation (norm1, norm1_context; single: norm). Qwen-Image 4 x (attention, img_mlp, txt_mlp),
# gathers img_mod/txt_mod. Wan 4 x (attn1, attn2, ffn + 4 q/k norms across heads). Z-Image
# (1 noise + 1 context refiner + 4 layers) x (attention, feed_forward), gathers: the 5 modulated
# layers. FLUX.2 2 x 3 + 2 x 1, gathers its 3 shared modulations.
PER_CALL = {"flux": (8, 6), "qwenimage": (12, 8), "wan": (28, 0), "zimage": (12, 5), "flux2": (8, 3)}
BLOCK_PREFIXES = {
    "flux": ("transformer_blocks.", "single_transformer_blocks."),
    "flux2": ("transformer_blocks.", "single_transformer_blocks."),
    "qwenimage": ("transformer_blocks.",),
    "wan": ("blocks.",),
    "zimage": ("layers.", "noise_refiner.", "context_refiner."),
}
FAMILIES = tuple(PER_CALL)
CACHE = dict(warmup_steps=1, residual_diff_threshold="calibrated")  # see test_context_parallel.py
TE = ("flux", "wan")  # text encoders whose heads (and key/value heads) divide over 4 ranks


def _job(family, parallel, cache=None, steps=STEPS):
    return dict(kind="pipe", family=family, parallel=parallel, cache=cache, steps=steps)


JOBS = {
    2: [
        *[_job(f, dict(tensor=2, text_encoder=f != "flux2")) for f in FAMILIES],  # flux2's Mistral3 has no plan
        _job("wan", dict(tensor=2), cache=CACHE, steps=4),  # pure TP: identical statistics, no reduce needed
        dict(kind="disable"), dict(kind="errors"),
    ],
    4: [
        *[_job(f, dict(tensor=4, text_encoder=f in TE)) for f in FAMILIES],
        *[_job(f, dict(ulysses=2, tensor=2)) for f in ("flux", "wan")],
        *[_job(f, dict(ulysses=2, tensor=2), cache=CACHE, steps=4) for f in ("flux", "wan")],
        dict(kind="errors"),
    ],
}


def _images(out):
    return out.images if hasattr(out, "images") else out.frames


def _run(pipe, job):
    return _images(pipe(prompt=PROMPT, **tiny_call_kwargs(job["family"], num_inference_steps=job["steps"])))


def _tensors(x) -> list[torch.Tensor]:
    if torch.is_tensor(x):
        return [x]
    return [t for y in x for t in _tensors(y)] if isinstance(x, (list, tuple)) else []


def _embeddings(pipe):
    with torch.no_grad():
        return _tensors(pipe.encode_prompt(prompt=PROMPT))


def _bytes(module, prefixes=("",)) -> int:
    return sum(p.numel() * p.element_size() for n, p in module.named_parameters() if n.startswith(prefixes))


def _pattern(pipe):
    report = cachedit.summary(pipe)["cache"]
    return {name: [{ctx: (c["cached_steps"], c["residual_diffs"]) for ctx, c in stack["contexts"].items()}
                   for stack in r["stacks"]] for name, r in report.items() if name != "config"}


# ---------------------------------------------------------------------------------------------
# What each rank runs (module level: spawned processes import it)
# ---------------------------------------------------------------------------------------------

def _rank_worker(rank, world, jobs):
    return [_rank_pipe(job) if job["kind"] == "pipe" else globals()[f"_rank_{job['kind']}"](rank, world)
            for job in jobs]


def _rank_pipe(job):
    pipe = tiny_pipeline(job["family"])
    prefixes = BLOCK_PREFIXES[job["family"]]
    before = {"blocks": _bytes(pipe.transformer, prefixes), "whole": _bytes(pipe.transformer),
              "encoders": {n: _bytes(m) for n, m in text_encoders_of(pipe).items()}}
    calls = []
    counter = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    cachedit.accelerate(pipe, device="cpu_ref", parallel=job["parallel"], cache=job["cache"])
    after = {"blocks": _bytes(pipe.transformer, prefixes), "whole": _bytes(pipe.transformer),
             "encoders": {n: _bytes(m) for n, m in text_encoders_of(pipe).items()}}
    images = _run(pipe, job)
    applied = cachedit.applied(pipe)
    tp = applied["tensor_parallel"].parts["transformer"]
    out = dict(images=images, calls=len(calls), before=before, after=after, tp=tp.stats(), per_call=dict(tp.per_call),
               cp={n: cp.stats() for n, cp in applied["context_parallel"].parts.items()}
               if "context_parallel" in applied else {},
               pattern=_pattern(pipe) if job["cache"] else None)
    if job["parallel"].get("text_encoder"):
        out["embeddings"] = _embeddings(pipe)
    counter.remove()
    return out


def _rank_disable(rank, world):
    """Accelerate, run, disable: the same Parameter objects, no hooks left, the same output bit for bit."""
    job = _job("flux", dict(tensor=world, text_encoder=True))
    pipe = tiny_pipeline("flux")
    before = _run(pipe, job)
    modules = {n: getattr(pipe, n) for n in ("transformer", "text_encoder", "text_encoder_2")}
    params = {c: dict(m.named_parameters()) for c, m in modules.items()}

    def heads_now():
        return {(c, n): (getattr(s, "heads", None), getattr(s, "n_heads", None), getattr(s, "out_features", None))
                for c, m in modules.items() for n, s in m.named_modules()}

    heads = heads_now()

    def hooks_now():
        return {(c, n): list(s._diffusers_hook.hooks) for c, m in modules.items() for n, s in m.named_modules()
                if hasattr(s, "_diffusers_hook")}

    hooked = hooks_now()
    cachedit.accelerate(pipe, device="cpu_ref", parallel=job["parallel"])
    during = hooks_now()
    sharded = {c: dict(m.named_parameters()) for c, m in modules.items()}
    _run(pipe, job)
    cachedit.disable(pipe)
    same = all(params[c].keys() == dict(m.named_parameters()).keys()
               and all(p is params[c][n] for n, p in m.named_parameters()) for c, m in modules.items())
    return dict(bitwise=torch.equal(_run(pipe, job), before), same_params=same, heads=heads_now() == heads,
                restored=hooks_now() == hooked,
                sharded=sum(sharded[c].get(n) is not params[c][n] for c in modules for n in params[c]),
                tp_hooks=sorted({h for hs in during.values() for h in hs if h.startswith("cachedit.tp")}))


def _rank_errors(rank, world):
    """Validation under an initialised process group; each must leave the pipeline untouched."""
    cases = {
        "world_size": ("flux", dict(tensor=6 - world)),  # tensor=2 on 4 ranks, tensor=4 on 2
        "hybrid_world": ("flux", dict(ring=world // 2, ulysses=2, tensor=2)),
        "kv_heads": ("qwenimage", dict(tensor=world, text_encoder=True)) if world == 4 else None,
    }
    messages = {}
    for name, case in cases.items():
        if case is None:
            continue
        family, parallel = case
        pipe = tiny_pipeline(family)
        params = {n: p for n, p in pipe.transformer.named_parameters()}
        try:
            cachedit.accelerate(pipe, device="cpu_ref", parallel=parallel)
            messages[name] = "no error"
        except ValueError as exc:
            messages[name] = str(exc)
        hooked = [n for n, m in pipe.transformer.named_modules() if hasattr(m, "_diffusers_hook")]
        unchanged = all(p is params[n] for n, p in pipe.transformer.named_parameters())
        messages[name + ":untouched"] = not cachedit.is_accelerated(pipe) and not hooked and unchanged
    return messages


# ---------------------------------------------------------------------------------------------
# Fixtures: one-process references, one spawn per world size
# ---------------------------------------------------------------------------------------------

def _calibrated(job):
    """`job` with its cache threshold 10% above the largest relative change one process sees at the
    first step after warmup (so that step caches and later, larger changes compute)."""
    if not job.get("cache") or job["cache"]["residual_diff_threshold"] != "calibrated":
        return job
    pipe = tiny_pipeline(job["family"])
    cachedit.accelerate(pipe, device="cpu_ref", cache={**job["cache"], "residual_diff_threshold": 1e-9})
    _run(pipe, job)
    first = [diffs[min(diffs)] for t in _pattern(pipe).values() for stack in t for _, diffs in stack.values() if diffs]
    return {**job, "cache": {**job["cache"], "residual_diff_threshold": 1.1 * max(first)}}


_JOBS: dict = {}
_RESULTS: dict = {}


def _jobs(world):
    if world not in _JOBS:
        _JOBS[world] = [_calibrated(job) for job in JOBS[world]]
    return _JOBS[world]


def _results(world):
    if world not in _RESULTS:
        _RESULTS[world] = run_distributed(_rank_worker, world, args=(_jobs(world),))
    return _RESULTS[world]


_REFS: dict = {}


def _reference(job):
    """One process, the same kernel and cache config: pipeline output and prompt embeddings."""
    key = (job["family"], job["steps"], repr(job["cache"]))
    if key not in _REFS:
        pipe = tiny_pipeline(job["family"])
        cachedit.accelerate(pipe, device="cpu_ref", cache=job["cache"])
        _REFS[key] = dict(images=_run(pipe, job), embeddings=_embeddings(pipe) if job["family"] != "flux2" else None)
    return _REFS[key]


def _name(job):
    if job["kind"] != "pipe":
        return job["kind"]
    p = job["parallel"]
    mesh = "x".join(f"{k}{p[k]}" for k in ("ulysses", "tensor") if p.get(k, 1) > 1)
    return f"{job['family']}-{mesh}" + ("-te" if p.get("text_encoder") else "") + ("-cache" if job["cache"] else "")


PIPE_CASES = [(w, i) for w, jobs in JOBS.items() for i, j in enumerate(jobs) if j["kind"] == "pipe"]
PIPE_IDS = [f"{w}ranks-{_name(JOBS[w][i])}" for w, i in PIPE_CASES]


@pytest.mark.parametrize("world,index", PIPE_CASES, ids=PIPE_IDS)
def test_every_rank_matches_one_process(world, index):
    job = _jobs(world)[index]
    ranks = _results(world)
    ref = _reference(job)
    for rank, res in enumerate(ranks):
        got = res[index]["images"]
        diff = (got - ref["images"]).abs().max().item()
        assert diff <= ATOL, f"rank {rank}: max abs diff {diff:.3g} > {ATOL}"
        assert torch.equal(got, ranks[0][index]["images"]), f"rank {rank} differs from rank 0"
        if "embeddings" in res[index]:
            for a, b in zip(res[index]["embeddings"], ref["embeddings"], strict=True):
                if a.is_floating_point():
                    assert (a - b).abs().max().item() <= ATOL, f"rank {rank}: prompt embeddings differ"
                else:
                    assert torch.equal(a, b)
    if job["cache"]:
        patterns = [res[index]["pattern"] for res in ranks]
        assert all(p == patterns[0] for p in patterns), f"ranks cached different steps: {patterns}"
        cached = [s for t in patterns[0].values() for stack in t for steps, _ in stack.values() for s in steps]
        assert cached, f"the case caches nothing, so it tests nothing: {patterns[0]}"
    if job["parallel"].get("ulysses", 1) > 1:  # the sequence was split too
        assert ranks[0][index]["cp"]["transformer"]["world"]["calls"].get("all_to_all", 0) > 0


@pytest.mark.parametrize("world,index", [c for c in PIPE_CASES if not JOBS[c[0]][c[1]]["cache"]],
                         ids=[i for c, i in zip(PIPE_CASES, PIPE_IDS) if not JOBS[c[0]][c[1]]["cache"]])
def test_weights_per_rank_and_collectives_per_call(world, index):
    job = JOBS[world][index]
    tensor = job["parallel"]["tensor"]
    reduces, gathers = PER_CALL[job["family"]]
    for rank, res in enumerate(r[index] for r in _results(world)):
        before, after = res["before"], res["after"]
        blocks = after["blocks"] / before["blocks"]
        assert abs(blocks - 1 / tensor) <= BLOCK_ALLOWANCE, f"rank {rank}: blocks at {blocks:.3f} of full"
        replicated = before["whole"] - before["blocks"]  # embedders, final layer: whole on every rank
        assert after["whole"] <= replicated + before["blocks"] * (1 / tensor + BLOCK_ALLOWANCE)
        assert res["per_call"] == {"all_reduce": reduces, "all_gather": gathers}
        calls = res["tp"]["calls"]
        assert res["calls"] > 0
        assert calls.get("all_reduce", 0) == reduces * res["calls"]
        assert calls.get("all_gather", 0) == gathers * res["calls"]
        if job["parallel"].get("text_encoder"):
            for name, size in after["encoders"].items():
                assert size < before["encoders"][name], f"{name} was not sharded"


def test_disable_restores_bitwise():
    for res in _results(2):
        got = next(r for r, j in zip(res, JOBS[2]) if j["kind"] == "disable")
        assert got["bitwise"] and got["same_params"] and got["heads"] and got["restored"]
        assert got["sharded"] > 0
        assert got["tp_hooks"] == ["cachedit.tp.gather", "cachedit.tp.placement", "cachedit.tp.reduce"]


@pytest.mark.parametrize("world", [2, 4])
def test_validation_under_a_process_group(world):
    for res in _results(world):
        msgs = next(r for r, j in zip(res, JOBS[world]) if j["kind"] == "errors")
        assert msgs["world_size"].startswith(f"parallel: tensor={6 - world} needs world size {6 - world}, but "
                                             f"torch.distributed has {world}; launch with `torchrun --nproc-per-node")
        assert f"tensor=2 needs world size {2 * world}, but torch.distributed has {world}" in msgs["hybrid_world"]
        if world == 4:
            assert msgs["kv_heads"].startswith("ParallelConfig.text_encoder=True splits pipe.text_encoder over 4 "
                                               "ranks, which does not divide its 2 key/value heads")
        assert all(v for k, v in msgs.items() if k.endswith(":untouched")), msgs


# ---------------------------------------------------------------------------------------------
# One process: checks that need no process group come first
# ---------------------------------------------------------------------------------------------

def _refused(family, match, **kwargs):
    pipe = tiny_pipeline(family)
    params = {n: p for n, p in pipe.transformer.named_parameters()}
    with pytest.raises(ValueError, match=match):
        cachedit.accelerate(pipe, device="cpu_ref", **kwargs)
    assert not cachedit.is_accelerated(pipe)
    assert all(p is params[n] for n, p in pipe.transformer.named_parameters())
    assert not any(hasattr(m, "_diffusers_hook") for m in pipe.transformer.modules())


def test_heads_must_divide():
    _refused("flux", r"ParallelConfig.tensor=3 splits pipe.transformer over 3 ranks, which does not divide its 4 "
                     r"attention heads; allowed values: 1, 2, 4 \(divisors of 4\)", parallel=dict(tensor=3))


def test_family_without_a_plan():
    _refused("sd3", r"ParallelConfig.tensor=2: no tensor-parallel plan for pipe.transformer \(SD3Transformer2DModel\); "
                    r"supported: .*FluxTransformer2DModel.*WanTransformer3DModel", parallel=dict(tensor=2))
    _refused("flux2", r"ParallelConfig.text_encoder=True: no tensor-parallel plan for pipe.text_encoder "
                      r"\(Mistral3ForConditionalGeneration\)", parallel=dict(tensor=2, text_encoder=True))


def test_refused_combinations_and_missing_process_group():
    _refused("flux", r"parallel: tensor=2 x cfg=2 needs torch.distributed initialised with world size 4",
             parallel=dict(tensor=2, cfg=2))
    _refused("flux", r"ParallelConfig.ulysses=2 exceeds the 1 heads each tensor-parallel rank of pipe.transformer "
                     r"holds; allowed: ulysses <= 1", parallel=dict(ulysses=2, tensor=4))
    _refused("flux", r"ParallelConfig.tensor=2 with quantize= is not supported", parallel=dict(tensor=2),
             quantize=dict(scheme="int8"))
    _refused("flux", r"parallel: tensor=2 needs torch.distributed initialised with world size 2; launch with "
                     r"`torchrun --nproc-per-node 2", parallel=dict(tensor=2))
