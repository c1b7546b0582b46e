"""Device placement on a stand-in accelerator (`tests/fakes/accelerator.py`): every host/device mix a GPU or
NPU run would crash on fails here, on a CPU. Quantization, each parallel mode's collectives (Ulysses even and
uneven, Ring, tensor, CFG), the cache and the components run through it."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

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


@pytest.mark.parametrize("seqs", [(6, 6), (7, 5)], ids=["even", "uneven"])
def test_ulysses_collectives_take_device_tensors_only(seqs):
    for res in run_distributed(_ulysses_on_rank, 2, args=(list(seqs),), dist_backend=GROUP):
        assert res["err"] < 1e-5 and res["collectives"]


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


@pytest.mark.parametrize("seqs", [(6, 6), (7, 5)], ids=["even", "uneven"])
def test_ring_over_padding_keys_is_exact_whatever_lse_the_kernel_gives_empty_rows(seqs):
    for res in run_distributed(_ring_on_rank, 2, args=(list(seqs),), dist_backend=GROUP):
        assert res["err"] < 1e-5 and res["collectives"]


# -- a whole accelerated pipeline on the stand-in accelerator -------------------------------------------------------
class _PlacementPlugin:
    """A test-only backend whose device is the stand-in accelerator; kernels and collectives are the core's,
    quantized linears cpu_ref's emulation (device-agnostic code, so any host/device mix shows)."""

    NAME = "placement"

    @staticmethod
    def _mine(backend) -> bool:
        return backend.name == _PlacementPlugin.NAME

    from cachedit import hookimpl

    @hookimpl
    def cachedit_register_backends(self, registry):
        from cachedit import Backend

        registry.add(Backend(name=_PlacementPlugin.NAME, device_type=DEVICE.type, dist_backend=GROUP, priority=-10,
                             is_available=lambda: (True, ""), description="test-only stand-in accelerator"))

    @hookimpl
    def cachedit_quantized_linear(self, backend, spec):
        if not self._mine(backend):
            return None
        from cachedit_cpu_ref.quant import EmulatedLinearPath

        return EmulatedLinearPath(spec)


@pytest.fixture
def placement_backend(fresh_plugins):
    fresh_plugins.register(_PlacementPlugin(), _PlacementPlugin.NAME)
    fresh_plugins.collect_backends()
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
