"""VAE parallelism (decode split in bands) and ControlNet parallelism on 2 and 4 gloo ranks against one process.

Every distributed case runs inside one spawn per world size (process start-up dominates on a 2-core machine);
each test checks its own slice of the results.
"""

from __future__ import annotations

import pytest
import torch

import cachedit
from cachedit.config import ParallelConfig
from cachedit.parallel.controlnet import check_controlnet_parallel
from cachedit.parallel.vae import SUPPORTED_VAES, check_vae_parallel
from cachedit.testing.distributed import run_distributed
from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline
from cachedit.testing.tiny_controlnet import tiny_controlnet_call_kwargs, tiny_controlnet_pipeline

PROMPT = "a photo of a cat"
STEPS = 2
ATOL = 1e-5  # fp32: decoded images and pipeline outputs, every rank against one process
U2, R2, U4, USP = dict(ulysses=2), dict(ring=2), dict(ulysses=4), dict(ulysses=2, ring=2)
T2, T4, U2T2 = dict(tensor=2), dict(tensor=4), dict(ulysses=2, tensor=2)
# A tensor-parallel ControlNet's block weights per rank: 1/N plus what stays whole (q/k norms over
# head_dim, row-split biases on the first rank only). Measured on the tiny ControlNet: 0.4995-0.501
# at N=2 (also under ulysses=2 x tensor=2), 0.250-0.2515 at N=4.
BLOCK_ALLOWANCE = 0.02
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
# The tiny ControlNet's all-reduces and all-gathers per call under FLUX.1's plan: 1 double block x
# (attention, ff, ff_context) + 1 single block x proj_out; gathers: norm1, norm1_context, single norm.
CONTROLNET_PER_CALL = {"all_reduce": 4, "all_gather": 3}

# Latent shapes per VAE family: even, uneven over 2 and 4 ranks; (1, 4, 3, 8) has fewer rows than 4 ranks.
DECODES = {
    "flux": [(1, 4, 16, 16), (2, 4, 9, 12), (1, 4, 3, 8)],  # AutoencoderKL
    "flux2": [(1, 4, 10, 8)],  # AutoencoderKLFlux2
    "wan": [(1, 4, 2, 7, 8)],  # AutoencoderKLWan: 2 latent frames, decoded frame by frame
    "qwenimage": [(1, 4, 1, 5, 6)],  # AutoencoderKLQwenImage
}
TILED = (2, 4, 26, 20)  # AutoencoderKL tiles of 16 latent rows (stride 12): 6 tiles, one of 2 rows


def _pipe_job(parallel, controlnet=False, size=32):
    return dict(kind="pipe", parallel=parallel, controlnet=controlnet, size=size)


JOBS = {
    2: [
        dict(kind="decode", families=("flux", "flux2", "wan", "qwenimage")),
        _pipe_job(dict(U2, vae=True)),
        _pipe_job(dict(cfg=2, vae=True)),
        _pipe_job(dict(U2, controlnet=True), controlnet=True),
        _pipe_job(dict(R2, controlnet=True), controlnet=True),
        _pipe_job(U2, controlnet=True),  # controlnet=False: residuals split at the transformer's entry
        _pipe_job(dict(R2, controlnet=True), controlnet=True, size=36),  # 81 image tokens: uneven
        _pipe_job(dict(T2, controlnet=True), controlnet=True),
        _pipe_job(T2, controlnet=True),  # controlnet=False: whole on every rank, its residuals replicated
        dict(kind="errors"), dict(kind="disable"),
    ],
    4: [
        dict(kind="decode", families=("flux", "wan")),
        _pipe_job(dict(USP, vae=True), size=36),  # 18 latent rows over 4 ranks: uneven bands
        _pipe_job(dict(U4, controlnet=True), controlnet=True, size=36),
        _pipe_job(dict(USP, controlnet=True), controlnet=True),
        _pipe_job(dict(ring=4), controlnet=True),  # controlnet=False
        _pipe_job(dict(T4, controlnet=True), controlnet=True),
        _pipe_job(dict(U2T2, controlnet=True), controlnet=True),  # TP over the tensor group, CP over ulysses
    ],
}


def _pipeline(controlnet: bool):
    return tiny_controlnet_pipeline("flux") if controlnet else tiny_pipeline("flux")


def _run(pipe, job):
    kw = tiny_controlnet_call_kwargs if job["controlnet"] else tiny_call_kwargs
    kwargs = kw("flux", num_inference_steps=STEPS)
    kwargs.update(height=job["size"], width=job["size"])
    if job["controlnet"]:
        kwargs["control_image"] = kwargs["control_image"][..., :job["size"], :job["size"]]
    return pipe(prompt=PROMPT, **kwargs).images


def _latents(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _hooked(*modules):
    return {type(m).__name__: sorted(f"{n}:{h}" for n, c in m.named_modules() if hasattr(c, "_diffusers_hook")
                                      for h in c._diffusers_hook.hooks) for m in modules if m is not None}


# ---------------------------------------------------------------------------------------------
# What each rank runs (module level: spawned processes import it)
# ---------------------------------------------------------------------------------------------

def _rank_worker(rank, world, jobs):
    return [globals()[f"_rank_{job['kind']}"](rank, world, job) for job in jobs]


def _bytes(module, prefixes=("",)) -> int:
    return sum(p.numel() * p.element_size() for n, p in module.named_parameters() if n.startswith(prefixes))


def _rank_pipe(rank, world, job):
    pipe = _pipeline(job["controlnet"])
    controlnet = getattr(pipe, "controlnet", None)
    before = _bytes(controlnet, BLOCKS) if controlnet is not None else None
    cachedit.accelerate(pipe, device="cpu_ref", parallel=job["parallel"])
    blocks = _bytes(controlnet, BLOCKS) / before if controlnet is not None else None
    images = _run(pipe, job)
    report = cachedit.summary(pipe)
    record = cachedit.applied(pipe).get("controlnet_parallel")
    per_call = [dict(tp.per_call) for tp in record.parts["controlnet"].tensor_parallel] if record is not None else []
    return dict(images=images, vae=report["vae_parallel"], controlnet=report["controlnet_parallel"],
                controlnet_blocks=blocks, controlnet_per_call=per_call)


def _rank_decode(rank, world, job):
    """Random latents decoded with the VAE split over every rank, against the plain decode."""
    out = {}
    for family in job["families"]:
        pipe = tiny_pipeline(family)
        vae = pipe.vae
        shapes = DECODES[family] + ([TILED] if family == "flux" else [])
        with torch.no_grad():
            refs = []
            for shape in shapes:
                vae.use_tiling = shape is TILED
                refs.append(vae.decode(_latents(shape)).sample)
            cachedit.accelerate(pipe, device="cpu_ref", parallel=dict(ulysses=world, vae=True))
            vp = cachedit.applied(pipe)["vae_parallel"].parts["vae"]
            for shape, ref in zip(shapes, refs):
                vp.reset_stats()
                vae.use_tiling = shape is TILED
                got = vae.decode(_latents(shape)).sample
                out[(family, shape)] = dict(diff=(got - ref).abs().max().item(), same_shape=got.shape == ref.shape,
                                            image_bytes=ref.numel() * ref.element_size(), **vp.stats())
            cachedit.disable(pipe)
            vae.use_tiling = False
            out[(family, "restored")] = torch.equal(vae.decode(_latents(shapes[0])).sample, refs[0])
    return out


def _rank_errors(rank, world, job):
    """Validation under an initialised process group; each must leave the pipeline untouched."""
    cases = {
        "vae_class": ("ltx", dict(ulysses=world, vae=True)),  # AutoencoderKLLTXVideo
        "no_controlnet": ("flux", dict(ulysses=world, controlnet=True)),
        "controlnet_no_cp": ("controlnet", dict(cfg=2, controlnet=True)),
        "controlnet_tp_heads": ("controlnet", dict(tensor=world, controlnet=True)),
        "controlnet_heads": ("controlnet", dict(ulysses=world, controlnet=True)),
    }
    messages = {}
    for name, (family, parallel) in cases.items():
        pipe = tiny_controlnet_pipeline("flux") if family == "controlnet" else tiny_pipeline(family)
        if name in ("controlnet_heads", "controlnet_tp_heads"):  # fewer heads than the Ulysses / tensor degree
            cfg = dict(pipe.controlnet.config, num_attention_heads=1, attention_head_dim=64)
            pipe.register_modules(controlnet=type(pipe.controlnet).from_config(cfg))
        try:
            cachedit.accelerate(pipe, device="cpu_ref", parallel=parallel)
            messages[name] = "no error"
        except ValueError as exc:
            messages[name] = str(exc)
        messages[name + ":untouched"] = not cachedit.is_accelerated(pipe) and not any(
            _hooked(pipe.transformer, pipe.vae, getattr(pipe, "controlnet", None)).values())
    return messages


def _rank_disable(rank, world, job):
    """Accelerate, run, disable, for context and for tensor parallelism: the same output bit for bit,
    the same Parameter objects, no hooks left."""
    pipe = _pipeline(True)
    job = _pipe_job(None, controlnet=True)
    before = _run(pipe, job)
    hooked = _hooked(pipe.transformer, pipe.controlnet, pipe.vae)  # the pipeline's own cache_context registries
    params = {n: dict(getattr(pipe, n).named_parameters()) for n in ("transformer", "controlnet")}
    out = {}
    for mode, parallel in {"context": dict(ulysses=world, controlnet=True, vae=True),
                           "tensor": dict(tensor=world, controlnet=True)}.items():
        cachedit.accelerate(pipe, device="cpu_ref", parallel=parallel)
        during = _hooked(pipe.transformer, pipe.controlnet, pipe.vae)
        _run(pipe, job)
        cachedit.disable(pipe)
        same = all(p is params[n][k] for n in params for k, p in getattr(pipe, n).named_parameters()) and all(
            len(dict(getattr(pipe, n).named_parameters())) == len(params[n]) for n in params)
        out[mode] = dict(bitwise=torch.equal(_run(pipe, job), before), same_params=same, during=during,
                         restored=_hooked(pipe.transformer, pipe.controlnet, pipe.vae) == hooked)
    return out


# ---------------------------------------------------------------------------------------------
# Fixtures: one-process references, one spawn per world size
# ---------------------------------------------------------------------------------------------

_RESULTS: dict = {}


def _results(world):
    if world not in _RESULTS:
        _RESULTS[world] = run_distributed(_rank_worker, world, args=(JOBS[world],))
    return _RESULTS[world]


@pytest.fixture(scope="module")
def references():
    refs = {}
    for job in (j for jobs in JOBS.values() for j in jobs if j["kind"] == "pipe"):
        key = (job["controlnet"], job["size"])
        if key not in refs:
            pipe = _pipeline(job["controlnet"])
            cachedit.accelerate(pipe, device="cpu_ref")  # the same attention kernel, one process
            refs[key] = _run(pipe, job)
    return refs


def _name(job):
    return "-".join(f"{k}{v}" if v is not True else k for k, v in job["parallel"].items()) + (
        f"-controlnet_pipe-{job['size']}px" if job["controlnet"] else f"-{job['size']}px")


PIPE_CASES = [(w, i) for w, jobs in JOBS.items() for i, j in enumerate(jobs) if j["kind"] == "pipe"]


@pytest.mark.parametrize("world,index", PIPE_CASES, ids=[f"{w}ranks-{_name(JOBS[w][i])}" for w, i in PIPE_CASES])
def test_pipeline_matches_one_process(world, index, references):
    job = JOBS[world][index]
    ref = references[(job["controlnet"], job["size"])]
    ranks = _results(world)
    for rank, res in enumerate(ranks):
        diff = (res[index]["images"] - ref).abs().max().item()
        assert diff <= ATOL, f"rank {rank}: max abs diff {diff:.3g} > {ATOL}"
        assert torch.equal(res[index]["images"], ranks[0][index]["images"]), f"rank {rank} differs from rank 0"
    got = ranks[0][index]
    if job["parallel"].get("vae"):
        assert got["vae"]["decoder_calls"] == {"split": 1, "whole": 0}
        assert got["vae"]["bytes"]["send_recv_ring"] > 0
    if job["parallel"].get("controlnet"):  # its residuals stay split: the transformer's hook checks their length
        (stats,) = got["controlnet"]
        assert sum(sum(c["bytes"].values()) for c in stats.values()) > 0
    else:
        assert got["controlnet"] in (None, [])
    tensor = job["parallel"].get("tensor", 1) if job["parallel"].get("controlnet") else 1
    if job["controlnet"]:  # the ControlNet's block weights: 1/N per rank when sharded, whole otherwise
        for rank, res in enumerate(ranks):
            blocks = res[index]["controlnet_blocks"]
            assert abs(blocks - 1 / tensor) <= (BLOCK_ALLOWANCE if tensor > 1 else 0), f"rank {rank}: {blocks:.3f}"
    if tensor > 1:  # every block of the ControlNet ends in its all-reduce, over the tensor group only
        assert got["controlnet_per_call"] == [CONTROLNET_PER_CALL]
        calls = stats["tensor"]["calls"]
        assert calls == {k: v * STEPS for k, v in CONTROLNET_PER_CALL.items()}, calls
        assert (("world" in stats) if job["parallel"].get("ulysses", 1) > 1 else set(stats) == {"tensor"}), stats


@pytest.mark.parametrize("world", [2, 4])
def test_decode_matches_one_device(world):
    for rank, res in enumerate(_results(world)):
        decodes = next(r for r, j in zip(res, JOBS[world]) if j["kind"] == "decode")
        for key, got in decodes.items():
            if key[1] == "restored":
                assert got, f"rank {rank} {key[0]}: decode after disable() is not bitwise the original"
                continue
            assert got["same_shape"] and got["diff"] <= ATOL, f"rank {rank} {key}: {got['diff']:.3g} > {ATOL}"
            family, shape = key
            if shape[-2] < world:  # too few rows to split: decoded whole on every rank, nothing exchanged
                assert got["decoder_calls"] == {"split": 0, "whole": 1} and not got["bytes"], (key, got)
            elif shape == TILED:  # each tile's decode is split, except a 2-row tile on 4 ranks
                assert got["decoder_calls"] == ({"split": 6, "whole": 0} if world == 2 else {"split": 4, "whole": 2})
            else:
                frames = shape[2] if len(shape) == 5 else 1
                assert got["decoder_calls"] == {"split": frames, "whole": 0}, (key, got)
                assert got["bytes"]["send_recv_ring"] > 0


def test_validation_under_a_process_group():
    for msgs in (next(r for r, j in zip(res, JOBS[2]) if j["kind"] == "errors") for res in _results(2)):
        assert "ParallelConfig.vae=True" in msgs["vae_class"] and "AutoencoderKLLTXVideo" in msgs["vae_class"]
        assert all(c in msgs["vae_class"] for c in SUPPORTED_VAES), msgs["vae_class"]
        assert "ParallelConfig.controlnet=True" in msgs["no_controlnet"] and "no `controlnet`" in msgs["no_controlnet"]
        assert "ulysses > 1, ring > 1 or tensor > 1" in msgs["controlnet_no_cp"]
        assert ("ParallelConfig.tensor=2 with controlnet=True splits pipe.controlnet over 2 ranks, which does not "
                "divide its 1 attention heads") in msgs["controlnet_tp_heads"]
        assert "exceeds the 1 attention heads of pipe.controlnet" in msgs["controlnet_heads"]
        assert all(v for k, v in msgs.items() if k.endswith(":untouched")), msgs


def test_disable_restores_bitwise():
    for res in _results(2):
        got = next(r for r, j in zip(res, JOBS[2]) if j["kind"] == "disable")
        for mode in ("context", "tensor"):
            assert got[mode]["bitwise"] and got[mode]["restored"] and got[mode]["same_params"], mode
        during = got["context"]["during"]
        assert any(h.endswith("cachedit.controlnet.residuals") for h in during["FluxTransformer2DModel"])
        assert any("cachedit.cp" in h for h in during["FluxControlNetModel"])
        assert any(h.startswith("decoder:cachedit.vae") for h in during["AutoencoderKL"])
        during = got["tensor"]["during"]
        assert any("cachedit.tp.reduce" in h for h in during["FluxControlNetModel"])
        assert not any("cachedit.cp" in h or "cachedit.attention" in h for h in during["FluxControlNetModel"])


# ---------------------------------------------------------------------------------------------
# One process
# ---------------------------------------------------------------------------------------------

def test_checks_name_the_field_and_the_allowed_values():
    pipe = tiny_pipeline("ltx")
    with pytest.raises(ValueError, match=r"ParallelConfig.vae=True: pipe.vae is AutoencoderKLLTXVideo; supported VAE "
                                         r"classes: AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLWan"):
        check_vae_parallel(pipe, ParallelConfig(ulysses=2, vae=True))
    flux = tiny_pipeline("flux")
    with pytest.raises(ValueError, match=r"parallel: cfg=2 needs torch.distributed initialised with world size 2; "
                                         r"launch with `torchrun --nproc-per-node 2"):
        check_vae_parallel(flux, ParallelConfig(cfg=2, vae=True))
    flux.vae.decoder.conv_out.padding_mode = "reflect"
    with pytest.raises(ValueError, match=r"decoder.conv_out .*padding_mode 'reflect'.* cannot run on bands"):
        check_vae_parallel(flux, ParallelConfig(cfg=2, vae=True))
    with pytest.raises(ValueError, match=r"ParallelConfig.controlnet=True: pipe \(FluxPipeline\) has no `controlnet`"):
        check_controlnet_parallel(flux, ParallelConfig(ulysses=2, controlnet=True), [], None)
    with pytest.raises(ValueError, match=r"allowed: True only with ulysses > 1, ring > 1 or tensor > 1"):
        check_controlnet_parallel(flux, ParallelConfig(cfg=2, controlnet=True), [], None)
    controlnet = tiny_controlnet_pipeline("flux")  # the tensor-parallel checks need no process group
    with pytest.raises(ValueError, match=r"ParallelConfig.tensor=3 with controlnet=True splits pipe.controlnet over 3 "
                                         r"ranks, which does not divide its 4 attention heads; allowed values: 1, 2, 4"):
        check_controlnet_parallel(controlnet, ParallelConfig(tensor=3, controlnet=True), [], None)
