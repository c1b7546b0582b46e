"""Device placement on a stand-in accelerator (`tests/fakes/accelerator.py`): every host/device mix a GPU or
NPU run would crash on fails here, on a CPU. Quantization, each parallel mode's collectives (Ulysses even and
uneven, Ring, tensor, CFG), the cache and the components run through it."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from cachedit import hookimpl
from cachedit.config import QuantConfig
from cachedit.parallel.communicator import Communicator
from cachedit.quant.linear import apply_quantization, remove_quantization
from cachedit.testing.distributed import run_distributed

from .fakes.accelerator import DEVICE, PlacementError, accelerator, to_host

GROUP = f"cpu:gloo,{DEVICE.type}:gloo"  # the stand-in accelerator's tensors travel over gloo (as CPU data)


def test_harness_catches_a_host_tensor_in_a_device_op():
    with accelerator():
        x = torch.randn(3, 4, device=DEVICE)
        assert x.device == DEVICE
        x + torch.tensor(2.0)  # a 0-dim host tensor is a scalar, as CUDA accepts it
        with pytest.raises(PlacementError, match="host tensors"):
            x + torch.ones(4)
        assert x.to("cpu").device.type == "cpu" and x.sum().item() == pytest.approx(to_host(x).sum().item())


# -- quantization (finding 1: the quantized linear shared the bias the original took to the host) ---------------
def test_quantized_linears_run_on_the_device_and_disable_restores_bitwise():
    from cachedit_cpu_ref.quant import EmulatedLinearPath
    from cachedit.quant.spec import QuantSpec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 16)
    with accelerator():
        model.to(DEVICE)
        swapped = apply_quantization(model, QuantConfig(scheme="int8"), EmulatedLinearPath(QuantSpec("int8", "row")))
        y = model(x.to(DEVICE))
        assert y.device == DEVICE
        assert all(p.device == DEVICE for p in model.parameters())
        remove_quantization(swapped)
        assert all(p.device == DEVICE for p in model.parameters())
        after = {k: to_host(v) for k, v in model.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- collectives --------------------------------------------------------------------------------------------------
def _ulysses_on_rank(rank, world, seqs):
    from cachedit.parallel.ulysses import ulysses_attention
    from cachedit.testing.conformance import reference_attention

    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, 4, sum(seqs), 8, generator=g) for _ in range(3)]
    start = sum(seqs[:rank])
    local = [t[:, :, start:start + seqs[rank]] for t in full]

    def inner(q, k, v, mask):
        return reference_attention(q, k, v)[0].to(q.dtype)

    with accelerator() as log:
        q, k, v = (t.to(DEVICE) for t in local)
        out = ulysses_attention(Communicator(), q, k, v, None, inner, uneven=len(set(seqs)) > 1)
        assert out.device == DEVICE
        out = out.to("cpu")
    want = reference_attention(*full)[0].float()[:, :, start:start + seqs[rank]]
    return {"err": (out - want).abs().max().item(), "collectives": log}




class _ZeroLseOnEmptyRows:
    """A kernel that reports LSE 0 (not -inf) on rows with no kept key, as the mem-efficient kernel may."""

    @staticmethod
    def fn(q, k, v, *, attn_mask=None, is_causal=False, scale=None, return_lse=False):
        from .fakes.reference import attention64

        out, lse = attention64(q.to("cpu"), k.to("cpu"), v.to("cpu"), scale=scale,
                               keep=None if attn_mask is None else attn_mask.to("cpu"))
        lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        return out.to(q.dtype).to(q.device), lse.float().to(q.device)


def _ring_on_rank(rank, world, seqs):
    from cachedit.parallel.ring import ring_attention
    from cachedit.testing.conformance import reference_attention

    g = torch.Generator().manual_seed(0)
    total = sum(seqs)
    full = [torch.randn(1, 2, total, 8, generator=g) for _ in range(3)]
    keep = torch.ones(1, 1, 1, total, dtype=torch.bool)
    keep[..., seqs[0]:] = False  # the last rank's keys are all padding
    start = sum(seqs[:rank])
    local = [t[:, :, start:start + seqs[rank]] for t in full]
    with accelerator() as log:
        q, k, v = (t.to(DEVICE) for t in local)
        mask = keep[..., start:start + seqs[rank]].to(DEVICE)
        out = ring_attention(Communicator(), q, k, v, mask, None, _ZeroLseOnEmptyRows, uneven=len(set(seqs)) > 1)
        assert out.device == DEVICE
        out = out.to("cpu")
    want = reference_attention(*full, attn_mask=keep)[0].float()[:, :, start:start + seqs[rank]]
    return {"err": (out - want).abs().max().item(), "collectives": log}


def _attention_on_rank(rank, world):
    modes = (("ulysses", _ulysses_on_rank), ("ring", _ring_on_rank))
    return {f"{name}-{kind}": fn(rank, world, seqs) for name, fn in modes
            for kind, seqs in (("even", [6, 6]), ("uneven", [7, 5]))}


def test_ulysses_and_ring_exchange_device_tensors_only_and_ring_is_exact_over_padding_keys():
    """Ulysses and Ring, even and uneven shards, on the stand-in accelerator (Ulysses' uneven lengths were gathered
    from the host); Ring over padding keys with a kernel that reports LSE 0 on rows with no kept key (the merge
    shrank the output)."""
    for res in run_distributed(_attention_on_rank, 2, dist_backend=GROUP):
        for name, got in res.items():
            assert got["err"] < 1e-5 and got["collectives"], (name, got)


# -- a whole accelerated pipeline on the stand-in accelerator -------------------------------------------------------
class _PlacementPlugin:
    """A test-only backend whose device is the stand-in accelerator: cpu_ref's math kernel (with LSE, for Ring) and
    quantized emulation, the core's collectives (device-agnostic code, so any host/device mix shows)."""

    NAME = "placement"

    @staticmethod
    def _mine(backend) -> bool:
        return backend.name == _PlacementPlugin.NAME

    @hookimpl
    def cachedit_register_backends(self, registry):
        from cachedit import Backend

        registry.add(Backend(name=_PlacementPlugin.NAME, device_type=DEVICE.type, dist_backend=GROUP, priority=-10,
                             is_available=lambda: (True, ""), description="test-only stand-in accelerator"))

    @hookimpl
    def cachedit_attention_kernels(self, backend):
        if not self._mine(backend):
            return None
        from cachedit import AttentionKernel
        from cachedit_cpu_ref.attention import math_attention

        return [AttentionKernel(name="math", fn=math_attention, dtypes=frozenset({torch.float32}), returns_lse=True,
                                supports_mask=True, supports_causal=True, supports_gqa=True, priority=100)]

    @hookimpl
    def cachedit_quantized_linear(self, backend, spec):
        if not self._mine(backend):
            return None
        from cachedit_cpu_ref.quant import EmulatedLinearPath

        return EmulatedLinearPath(spec)


@pytest.fixture
def placement_backend(fresh_plugins):
    fresh_plugins.register(_PlacementPlugin(), _PlacementPlugin.NAME)  # the historic hook declares its backend
    return fresh_plugins.backends[_PlacementPlugin.NAME]


def test_accelerated_pipeline_with_cache_and_quantization_runs_on_the_device(placement_backend):
    import cachedit
    from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

    pipe = tiny_pipeline("flux")
    options = dict(cache=dict(Fn=1, Bn=0, residual_diff_threshold=0.2, warmup_steps=1), quantize=dict(scheme="int8"),
                   attention="torch_sdpa")  # the same kernel on both: only placement differs
    cachedit.accelerate(pipe, device="cpu_ref", **options)
    want = pipe("a photo of a cat", **tiny_call_kwargs("flux")).images
    cachedit.disable(pipe)
    with accelerator():
        pipe.to(DEVICE)
        cachedit.accelerate(pipe, device=_PlacementPlugin.NAME, **options)
        got = pipe("a photo of a cat", **tiny_call_kwargs("flux")).images
        info = cachedit.summary(pipe)
        cachedit.disable(pipe)
        assert got.device == DEVICE
        got = got.to("cpu")
    assert info["quantize"]["linears"]["transformer"] > 0
    # Under the harness composite ops reach the CPU decomposed (e.g. linear as t + addmm), which changes last bits;
    # int8 codes flipped by them move the image by ~1e-4 (measured 1.4e-4). Placement errors raise instead.
    assert (got - want).abs().max().item() < 1e-3


PARALLEL_MODES = {"cfg": dict(cfg=2), "ulysses_async": dict(ulysses=2, async_ulysses=True), "ring": dict(ring=2),
                  "tensor": dict(tensor=2), "components": dict(ulysses=2, text_encoder=True, vae=True)}


def _parallel_modes_on_rank(rank, world, modes):
    import cachedit
    import cachedit.plugins
    from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

    pm = cachedit.plugins.reload()
    pm.register(_PlacementPlugin(), _PlacementPlugin.NAME)
    out = {}
    for name, parallel in modes.items():
        pipe = tiny_pipeline("flux")
        call = lambda: dict(tiny_call_kwargs("flux", num_inference_steps=2))  # noqa: E731
        want = pipe("a photo of a cat", **call()).images
        with accelerator() as log:
            pipe.to(DEVICE)
            cachedit.accelerate(pipe, device=_PlacementPlugin.NAME, parallel=parallel)
            got = pipe("a photo of a cat", **call()).images.to("cpu")
            cachedit.disable(pipe)
        out[name] = {"err": (got - want).abs().max().item(), "collectives": sorted(set(log))}
    return out


def test_every_parallel_mode_and_the_components_exchange_device_tensors_only():
    """CFG, Ulysses (async), Ring, tensor parallel, text encoder and VAE parallel on two ranks
    whose tensors are on the stand-in accelerator: any host tensor in a collective or a device op raises."""
    for res in run_distributed(_parallel_modes_on_rank, 2, args=(PARALLEL_MODES,), dist_backend=GROUP):
        for name, got in res.items():
            assert got["collectives"], name
            assert got["err"] < 1e-4, (name, got["err"])
