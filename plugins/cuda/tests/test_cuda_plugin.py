"""The cuda plugin without a GPU: probes under faked hardware, kernel choice by compute capability, every
kernel against float64 attention through fakes that check the vendor contracts, the FP8 / INT8 paths'
math with the real torch._scaled_mm / torch._int_mm on CPU tensors against cpu_ref's exact emulation,
compile options, and NCCL's collectives logic over gloo.

Nothing here ran on an NVIDIA GPU.
"""

from __future__ import annotations

import inspect
import sys

import pytest
import torch
import torch.distributed as dist
from cachedit_cpu_ref.quant import EmulatedLinearPath
from cachedit_cpu_ref.quant import quantize as ref_quantize
from cachedit_cuda import attention as cuda_attention
from cachedit_cuda import plugin as cuda_plugin
from cachedit_cuda import ao as cuda_ao
from cachedit_cuda import quant as cuda_quant
from cachedit_cuda.communicator import NcclCommunicator

from cachedit.attention import select_kernel
from cachedit.config import CompileConfig, CompileTarget
from cachedit.plugins import manager
from cachedit.quant.linear import weight_bytes
from cachedit.quant.spec import QuantSpec
from cachedit.testing.conformance import ATTENTION_ATOL, reference_attention

from fake_cuda import FakeCuda, FakeTorchSDPA, VendorError, strict_int_mm, strict_scaled_mm
from fake_flash_attn import make_flash_attn_interface
from tests.fakes.reference import max_err, random_qkv, route_forward

HALF = (torch.float16, torch.bfloat16)


@pytest.fixture
def backend():
    return manager().backends["cuda"]


@pytest.fixture
def gpu(monkeypatch):
    """gpu(capabilities=((9, 0),), fa3=True, legacy_fa3=False, **FakeCuda kwargs) -> FakeCuda, with torch's
    SDPA backends faked and (if fa3) a fake flash_attn_interface importable."""

    def install(capabilities=((9, 0),), fa3=True, legacy_fa3=False, **kwargs):
        cuda = FakeCuda(monkeypatch, capabilities=capabilities, **kwargs)
        cuda.sdpa = FakeTorchSDPA(monkeypatch, cuda)
        cuda.fa3 = make_flash_attn_interface(lambda: cuda.capability, legacy=legacy_fa3) if fa3 else None
        monkeypatch.setitem(sys.modules, "flash_attn_interface", cuda.fa3)  # None: import fails
        return cuda

    return install


CPU_BUILD = pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build")


# -- availability ------------------------------------------------------------------------------------------------
@CPU_BUILD
def test_probe_reasons_without_cuda_build(monkeypatch):
    ok, reason = cuda_plugin.probe()
    assert not ok and "build without CUDA" in reason and torch.__version__ in reason
    monkeypatch.setattr(torch.version, "hip", "6.4.1", raising=False)
    ok, reason = cuda_plugin.probe()
    assert not ok and "ROCm" in reason


def test_probe_reasons_under_faked_hardware(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    FakeCuda(monkeypatch, available=False)
    ok, reason = cuda_plugin.probe()
    assert not ok and "is_available() is False" in reason and "CUDA 12.8" in reason
    assert "CUDA_VISIBLE_DEVICES=''" in reason
    FakeCuda(monkeypatch, capabilities=())
    ok, reason = cuda_plugin.probe()
    assert not ok and "device_count() is 0" in reason
    FakeCuda(monkeypatch, capabilities=((8, 0), (8, 0)))
    assert cuda_plugin.probe() == (True, "")
    assert cuda_plugin.device_capabilities() == [(8, 0), (8, 0)]


@CPU_BUILD
def test_no_kernels_offered_when_unavailable(backend):
    assert cuda_plugin.cachedit_attention_kernels(backend) == []
    assert cuda_plugin.cachedit_quantized_linear(backend, QuantSpec("fp8", "row")) is None
    assert cuda_plugin.kernel_report()["available"] is False


# -- kernel choice by capability -------------------------------------------------------------------------------
def test_hopper_offers_all_kernels_in_priority_order(gpu, backend):
    gpu(capabilities=((9, 0),), cudnn=91500)
    kernels = manager().attention_kernels(backend)
    names = [k.name for k in sorted(kernels, key=lambda k: -k.priority)]
    assert names == ["fa3", "cudnn_sdpa", "flash_sdpa", "efficient_sdpa", "torch_sdpa"]
    pick = lambda dtype, d, **needs: select_kernel(kernels, None, dtype, d, **needs).name  # noqa: E731
    assert pick(torch.bfloat16, 128) == "fa3"
    assert pick(torch.bfloat16, 128, need_lse=True, gqa=True, causal=True) == "fa3"
    assert pick(torch.float16, 128, mask=True) == "cudnn_sdpa"
    assert pick(torch.float16, 192, mask=True) == "efficient_sdpa"  # cuDNN declares head_dim <= 128
    assert pick(torch.float32, 64) == "efficient_sdpa"
    assert pick(torch.float16, 100) == "torch_sdpa"  # not a multiple of 8
    assert pick(torch.float32, 1024, mask=True) == "torch_sdpa"
    report = cuda_plugin.kernel_report()
    assert report["kernels"] == ["fa3", "cudnn_sdpa", "flash_sdpa", "efficient_sdpa"]
    assert report["skipped_kernels"] == {}


def test_ampere_has_no_fa3_and_names_why(gpu, backend):
    gpu(capabilities=((8, 0),))
    kernels = manager().attention_kernels(backend)
    assert "fa3" not in {k.name for k in kernels}
    assert select_kernel(kernels, None, torch.bfloat16, 128).name == "flash_sdpa"
    assert select_kernel(kernels, None, torch.bfloat16, 128, mask=True).name == "cudnn_sdpa"
    with pytest.raises(ValueError, match="attention='fa3' is not a kernel of this backend"):
        select_kernel(kernels, "fa3", torch.bfloat16, 128)
    assert "9.x only" in cuda_plugin.kernel_report()["skipped_kernels"]["fa3"]
    # mixed machines: FA3 only when every visible device is Hopper
    gpu(capabilities=((9, 0), (8, 0)))
    assert "fa3" not in {k.name for k in cuda_plugin.cachedit_attention_kernels(backend)}


def test_forcing_a_kernel_without_the_needed_capability_fails_clearly(gpu, backend):
    gpu(capabilities=((9, 0),))
    kernels = manager().attention_kernels(backend)
    with pytest.raises(ValueError, match="attention='flash_sdpa' cannot serve this model: attention masks"):
        select_kernel(kernels, "flash_sdpa", torch.float16, 64, mask=True)
    with pytest.raises(ValueError, match="attention='fa3' cannot serve this model: dtype torch.float32"):
        select_kernel(kernels, "fa3", torch.float32, 64)
    with pytest.raises(ValueError, match="attention='cudnn_sdpa' cannot serve this model: head_dim 256"):
        select_kernel(kernels, "cudnn_sdpa", torch.bfloat16, 256)
    with pytest.raises(ValueError, match="attention='torch_sdpa' cannot serve this model: it does not return"):
        select_kernel(kernels, "torch_sdpa", torch.bfloat16, 64, need_lse=True)


def test_probes_leave_out_kernels_this_build_or_device_cannot_run(gpu, backend):
    gpu(capabilities=((9, 0),), fa3=False)  # flash_attn_interface not importable
    skipped = cuda_attention.offered_kernels([(9, 0)])[1]
    assert "import flash_attn_interface failed" in skipped["fa3"]
    gpu(capabilities=((9, 0),), cudnn=8907, flash=False)
    skipped = cuda_attention.offered_kernels([(9, 0)])[1]
    assert "cuDNN >= 9.0" in skipped["cudnn_sdpa"] and "no flash attention" in skipped["flash_sdpa"]
    gpu(capabilities=((7, 5),))
    kernels, skipped = cuda_attention.offered_kernels([(7, 5)])
    assert [k.name for k in kernels] == ["efficient_sdpa"] and torch.bfloat16 not in kernels[0].dtypes
    assert "sm_80..sm_121" in skipped["cudnn_sdpa"]


# -- every kernel against float64 attention ----------------------------------------------------------------------
KERNEL_DTYPES = [(n, d) for n in ("fa3", "cudnn_sdpa", "flash_sdpa", "efficient_sdpa") for d in HALF] + [
    ("efficient_sdpa", torch.float32)]


def _kernel(name):
    return {k.name: k for k in cuda_attention.offered_kernels([(9, 0)])[0]}[name]


@pytest.mark.parametrize("name,dtype", KERNEL_DTYPES, ids=lambda v: str(v).replace("torch.", ""))
def test_kernel_outputs_match_float64_reference(gpu, name, dtype):
    cuda = gpu(capabilities=((9, 0),))
    kernel, tol = _kernel(name), ATTENTION_ATOL[dtype]
    q, k, v = random_qkv(dtype)
    out = kernel.fn(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    assert max_err(out, reference_attention(q, k, v)[0]) <= tol
    q, k, v = random_qkv(dtype, heads=8, kv_heads=2)  # GQA
    assert max_err(kernel.fn(q, k, v), reference_attention(q, k, v)[0]) <= tol
    q, k, v = random_qkv(dtype, sq=29)  # causal, square
    assert max_err(kernel.fn(q, k, v, is_causal=True), reference_attention(q, k, v, is_causal=True)[0]) <= tol
    q, k, v = random_qkv(dtype, sq=13, sk=29)  # causal, seq_q < seq_k: bottom-right, as cachedit defines it
    if name == "flash_sdpa":
        with pytest.raises(ValueError, match="seq_q != seq_k"):
            kernel.fn(q, k, v, is_causal=True)
    else:
        assert max_err(kernel.fn(q, k, v, is_causal=True), reference_attention(q, k, v, is_causal=True)[0]) <= tol
    if kernel.supports_mask:
        q, k, v = random_qkv(dtype)
        keep = torch.rand(2, 1, 37, 29, generator=torch.Generator().manual_seed(1)) > 0.3
        keep[..., 0] = True
        masks = (keep, torch.zeros(keep.shape).masked_fill(~keep, -1e4).to(dtype),
                 torch.randn(2, 1, 1, 29, generator=torch.Generator().manual_seed(2)).to(dtype), keep[:, :, :1])
        for mask in masks:
            assert max_err(kernel.fn(q, k, v, attn_mask=mask), reference_attention(q, k, v, attn_mask=mask)[0]) <= tol
            out, lse = kernel.fn(q, k, v, attn_mask=mask, return_lse=True)
            ref, ref_lse = reference_attention(q, k, v, attn_mask=mask)
            assert max_err(out, ref) <= tol and max_err(lse, ref_lse) <= max(10 * tol, 2e-6)
    else:
        with pytest.raises(ValueError, match="does not take attention masks"):
            kernel.fn(q, k, v, attn_mask=torch.ones(37, 29, dtype=torch.bool))
    calls = cuda.fa3.calls if name == "fa3" else cuda.sdpa.calls
    assert calls, "the kernel did not reach its vendor entry point"


@pytest.mark.parametrize("name,dtype", KERNEL_DTYPES, ids=lambda v: str(v).replace("torch.", ""))
def test_kernel_lse_matches_float64_reference(gpu, name, dtype):
    cuda = gpu(capabilities=((9, 0),))
    kernel = _kernel(name)
    for kv_heads, causal, sq in ((4, False, 37), (2, False, 37), (4, True, 29)):
        q, k, v = random_qkv(dtype, kv_heads=kv_heads, sq=sq)
        out, lse = kernel.fn(q, k, v, scale=0.1, is_causal=causal, return_lse=True)
        ref, ref_lse = reference_attention(q, k, v, scale=0.1, is_causal=causal)
        assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32
        assert max_err(lse, ref_lse) <= max(10 * ATTENTION_ATOL[dtype], 2e-6)
        assert max_err(out, ref) <= ATTENTION_ATOL[dtype]
    if name != "fa3":
        assert {c[0] for c in cuda.sdpa.calls} == {"aten"}  # the LSE comes from the aten op


def test_fa3_lse_of_rows_with_nothing_to_attend_is_minus_inf(gpu):
    gpu(capabilities=((9, 0),))
    q, k, v = random_qkv(torch.bfloat16, sq=29, sk=13)  # causal with seq_q > seq_k: the first 16 rows are empty
    out, lse = _kernel("fa3").fn(q, k, v, is_causal=True, return_lse=True)
    assert torch.isneginf(lse[..., :16]).all() and torch.isfinite(lse[..., 16:]).all()
    assert (out[..., :16, :] == 0).all()


@pytest.mark.parametrize("name", ["cudnn_sdpa", "efficient_sdpa"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float16], ids=["bool", "float"])
def test_rows_with_no_kept_key_give_zero_and_lse_minus_inf(gpu, name, mask_dtype):
    """Fully masked rows (Ring attention over padding keys): cuDNN gets -65504 where torch gives it -65504 (the
    fake rejects -inf), the mem-efficient kernel may report LSE 0 there (the fake does); cachedit's convention
    is output 0 and LSE -inf on such rows, whatever the kernel does."""
    gpu(capabilities=((9, 0),))
    kernel = _kernel(name)
    q, k, v = random_qkv(torch.float16)
    keep = torch.rand(2, 1, 37, 29, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[..., 0] = True
    keep[:, :, :5] = False  # five rows with nothing to attend to
    mask = keep if mask_dtype == torch.bool else torch.zeros(keep.shape).masked_fill(~keep, float("-inf")).half()
    ref, ref_lse = reference_attention(q, k, v, attn_mask=keep)
    for out, lse in (kernel.fn(q, k, v, attn_mask=mask, return_lse=True), (kernel.fn(q, k, v, attn_mask=mask), None)):
        assert (out[:, :, :5] == 0).all()
        assert max_err(out[:, :, 5:], ref[:, :, 5:]) <= ATTENTION_ATOL[torch.float16]
        if lse is not None:
            assert torch.isneginf(lse[:, :, :5]).all()
            assert max_err(lse[:, :, 5:], ref_lse[:, :, 5:]) <= 4e-2


def test_cudnn_ranks_above_flash_only_where_torch_prefers_it(gpu):
    """torch's sdp_utils (check_prefer_cudnn_attention) puts cuDNN first only from cuDNN 9.15 on sm90 / sm100;
    elsewhere it ranks below flash (and still above the mem-efficient kernel)."""
    def order(caps, cudnn):
        gpu(capabilities=caps, cudnn=cudnn)
        kernels = cuda_attention.offered_kernels(list(caps))[0]
        return [k.name for k in sorted(kernels, key=lambda k: -k.priority) if k.name != "fa3"]

    assert order(((9, 0),), 91500) == ["cudnn_sdpa", "flash_sdpa", "efficient_sdpa"]
    assert order(((9, 0),), 91002) == ["flash_sdpa", "cudnn_sdpa", "efficient_sdpa"]
    assert order(((8, 0),), 91500) == ["flash_sdpa", "cudnn_sdpa", "efficient_sdpa"]
    assert order(((9, 0),), 90000) == ["flash_sdpa", "cudnn_sdpa", "efficient_sdpa"]


def test_fa3_works_with_releases_returning_lse_always(gpu):
    cuda = gpu(capabilities=((9, 0),), legacy_fa3=True)
    kernel = _kernel("fa3")
    q, k, v = random_qkv(torch.float16)
    assert max_err(kernel.fn(q, k, v), reference_attention(q, k, v)[0]) <= ATTENTION_ATOL[torch.float16]
    out, lse = kernel.fn(q, k, v, return_lse=True)
    assert max_err(lse, reference_attention(q, k, v)[1]) <= 4e-2 and len(cuda.fa3.calls) == 2


def test_fakes_reject_what_the_vendor_rejects(gpu):
    cuda = gpu(capabilities=((9, 0),))
    q, k, v = random_qkv(torch.float16)
    fa3 = cuda.fa3.flash_attn_func
    with pytest.raises(VendorError, match="contiguous last dimension"):
        fa3(q.transpose(-1, -2), k, v)
    with pytest.raises(VendorError, match="fp16, bf16"):
        fa3(*(t.float().transpose(1, 2) for t in (q, k, v)))
    with pytest.raises(TypeError):
        fa3(q, k, v, scale=0.1)  # the real argument is softmax_scale
    with pytest.raises(VendorError, match="one backend pinned"):
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.FLASH_ATTENTION]):
        with pytest.raises(VendorError, match="does not support attn_mask"):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(37, 29, dtype=torch.bool))
    with pytest.raises(VendorError, match="not correctly aligned"):
        torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, torch.zeros(2, 4, 37, 29, dtype=q.dtype),
                                                               True)
    gpu(capabilities=((8, 0),))
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
        with pytest.raises(VendorError, match="no more than 128"):
            torch.nn.functional.scaled_dot_product_attention(*random_qkv(torch.float16, dim=256))


# -- quantized linears --------------------------------------------------------------------------------------------
def _linear_case(dtype, m=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 64, generator=g)
    w[3] *= 20  # an outlier output channel
    rows = (2, m // 2) if m % 2 == 0 else (1, m)
    x = torch.randn(*rows, 64, generator=g).to(dtype)
    return x, w.to(dtype), torch.randn(48, generator=g).to(dtype)


@pytest.fixture
def strict_gemms(gpu, monkeypatch):
    cuda = gpu(capabilities=((9, 0),))
    scaled_mm = strict_scaled_mm(torch._scaled_mm, lambda: cuda.capability)
    int_mm = strict_int_mm(torch._int_mm)
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    monkeypatch.setattr(torch, "_int_mm", int_mm)
    return scaled_mm, int_mm


# Tolerances against cpu_ref's float64 emulation of the same quantized operands, relative to the output's
# largest magnitude: bf16 output rounding (2^-8) for row-wise FP8 and bfloat16/float16 outputs, float32
# accumulation only otherwise.
def _tol(dtype, rowwise_fp8=False):
    if dtype == torch.float32 and not rowwise_fp8:
        return 1e-5
    return 2 ** -7 if (dtype == torch.bfloat16 or rowwise_fp8) else 2 ** -10


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fp8_scaled_mm_path_matches_cpu_ref_emulation(strict_gemms, granularity, dtype, with_bias):
    scaled_mm, _ = strict_gemms
    spec = QuantSpec("fp8", granularity)
    path = cuda_quant.path_for(spec, [(9, 0)], use_torchao=False)
    assert isinstance(path, cuda_quant.ScaledMMLinearPath)
    x, w, b = _linear_case(dtype)
    b = b if with_bias else None
    qw, scale = path.quantize_weight(w)
    rq, rs = ref_quantize(w, "fp8", granularity)
    assert qw.dtype == torch.float8_e4m3fn and qw.is_contiguous()
    assert torch.equal(qw.view(torch.uint8), rq.view(torch.uint8))  # the same float8 codes, bit for bit
    assert scale.dtype == torch.float32 and torch.equal(scale, rs)
    y = path.linear(x, qw, scale, b)
    ref = EmulatedLinearPath(spec).linear(x, rq, rs, b)
    assert y.shape == ref.shape and y.dtype == dtype
    rel = ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    assert rel <= _tol(dtype, rowwise_fp8=granularity == "row"), rel
    call = scaled_mm.calls[-1]
    assert call["rowwise"] == (granularity == "row")
    assert call["bias"] == (with_bias and call["out_dtype"] != torch.float32)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("m", [40, 3])
def test_int8_int_mm_path_matches_cpu_ref_emulation(strict_gemms, granularity, dtype, m):
    _, int_mm = strict_gemms
    spec = QuantSpec("int8", granularity)
    path = cuda_quant.path_for(spec, [(8, 0)], use_torchao=False)
    assert isinstance(path, cuda_quant.IntMMLinearPath)
    x, w, b = _linear_case(dtype, m=m)
    qw, scale = path.quantize_weight(w)
    rq, rs = ref_quantize(w, "int8", granularity)
    assert torch.equal(qw, rq) and torch.equal(scale, rs)
    y = path.linear(x, qw, scale, b)
    ref = EmulatedLinearPath(spec).linear(x, rq, rs, b)
    rel = ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    assert y.dtype == dtype and rel <= _tol(dtype), rel
    assert int_mm.calls[-1][0] >= 17  # fewer rows were padded for cuBLASLt


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_weight_only_path_matches_cpu_ref_emulation(scheme):
    spec = QuantSpec(scheme, "row", weight_only=True)
    path = cuda_quant.path_for(spec, [(7, 5)], use_torchao=False)
    x, w, b = _linear_case(torch.float32)
    qw, scale = path.quantize_weight(w)
    assert qw.element_size() == 1
    y = path.linear(x, qw, scale, b)
    ref = EmulatedLinearPath(spec).linear(x, *ref_quantize(w, scheme, "row"), b)
    assert ((y - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_quant_paths_follow_compute_capability(gpu, backend, monkeypatch):
    monkeypatch.setenv("CACHEDIT_CUDA_TORCHAO", "0")  # the plugin's own paths (torchao's: below)
    fp8, int8 = QuantSpec("fp8", "row"), QuantSpec("int8", "tensor")
    gpu(capabilities=((8, 0),))
    assert cuda_plugin.cachedit_quantized_linear(backend, fp8) is None
    assert "8.9" in cuda_quant.unsupported(fp8, [(8, 0)])
    assert isinstance(cuda_plugin.cachedit_quantized_linear(backend, int8), cuda_quant.IntMMLinearPath)
    gpu(capabilities=((8, 9),))
    assert isinstance(cuda_plugin.cachedit_quantized_linear(backend, fp8), cuda_quant.ScaledMMLinearPath)
    gpu(capabilities=((7, 5),))
    assert cuda_plugin.cachedit_quantized_linear(backend, int8) is None
    assert isinstance(cuda_plugin.cachedit_quantized_linear(backend, QuantSpec("int8", "row", True)),
                      cuda_quant.DequantLinearPath)
    assert cuda_plugin.kernel_report()["quant"]["fp8/row"].startswith("fp8 W8A8 (torch._scaled_mm) needs")


@pytest.mark.parametrize("scheme,granularity", [("fp8", "tensor"), ("fp8", "row"), ("int8", "row")])
def test_layers_the_gemm_cannot_take_run_the_same_math_without_it(strict_gemms, scheme, granularity):
    scaled_mm, int_mm = strict_gemms
    spec = QuantSpec(scheme, granularity)
    path = cuda_quant.path_for(spec, [(9, 0)], use_torchao=False)
    g = torch.Generator().manual_seed(0)
    w, x, b = torch.randn(50, 36, generator=g), torch.randn(3, 7, 36, generator=g), torch.randn(50, generator=g)
    qw, scale = path.quantize_weight(w)
    assert not path.gemm_fits(qw) and qw.shape == w.shape
    y = path.linear(x, qw, scale, b)
    ref = EmulatedLinearPath(spec).linear(x, *ref_quantize(w, scheme, granularity), b)
    assert ((y - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    assert not scaled_mm.calls and not int_mm.calls  # the GEMM kernels (which would refuse) were not called


# -- torchao path: its int8 and weight-only configs run on a CPU, so they run here for real ---------------------
TORCHAO_CPU_SPECS = [QuantSpec("int8", "tensor"), QuantSpec("int8", "row"), QuantSpec("int8", "row", True),
                     QuantSpec("fp8", "row", True), QuantSpec("fp8", "tensor", True)]


@pytest.mark.parametrize("spec", TORCHAO_CPU_SPECS, ids=lambda s: f"{s.scheme}-{s.granularity}-wo{int(s.weight_only)}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_torchao_path_matches_cpu_ref_emulation(spec, dtype):
    pytest.importorskip("torchao")
    path = cuda_quant.path_for(spec, [(9, 0)], use_torchao=True)
    assert isinstance(path, cuda_ao.TorchaoLinearPath)
    x, w, b = _linear_case(dtype)
    linear = torch.nn.Linear(64, 48, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(w), linear.bias.copy_(b)
    before = linear.weight.detach().clone()
    module = path.quantize_module(linear)
    assert torch.equal(linear.weight, before) and type(linear.weight) is torch.nn.Parameter  # original untouched
    assert type(module.weight).__name__ != "Parameter" and weight_bytes(module) < 0.6 * weight_bytes(linear)
    y = module(x)
    ref = EmulatedLinearPath(spec).linear(x, *ref_quantize(w, spec.scheme, spec.granularity), b)
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    rel = ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    rel_exact = ((y.double() - exact).abs().max() / exact.abs().max()).item()
    # torchao's int8 scale is amax / 127.5 where ours is amax / 127: the two quantizations of the same
    # operands differ by up to one code, so against the emulation allow a few codes' worth (measured <= 0.9%)
    assert y.dtype == dtype and y.shape == ref.shape and rel <= 0.015, rel
    assert rel_exact <= 0.03, rel_exact


def test_torchao_is_preferred_when_installed_and_follows_capability(gpu, backend, monkeypatch):
    pytest.importorskip("torchao")
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor

    gpu(capabilities=((9, 0),))
    fp8 = QuantSpec("fp8", "row")
    assert isinstance(cuda_plugin.cachedit_quantized_linear(backend, fp8), cuda_ao.TorchaoLinearPath)
    config = cuda_ao.config_for(fp8)
    assert isinstance(config, Float8DynamicActivationFloat8WeightConfig)
    assert [type(g) for g in config.granularity] == [PerRow, PerRow]  # activations and weights
    assert [type(g) for g in cuda_ao.config_for(QuantSpec("fp8", "tensor")).granularity] == [PerTensor, PerTensor]
    assert cuda_ao.config_for(fp8).set_inductor_config is False  # the plugin's compile options stay in charge
    assert cuda_plugin.kernel_report()["torchao_path"] == "used for every offered scheme"
    gpu(capabilities=((8, 0),))
    assert cuda_plugin.cachedit_quantized_linear(backend, fp8) is None  # torchao does not lift the 8.9 rule
    monkeypatch.setenv("CACHEDIT_CUDA_TORCHAO", "0")
    assert isinstance(cuda_plugin.cachedit_quantized_linear(backend, QuantSpec("int8", "row")),
                      cuda_quant.IntMMLinearPath)
    assert "CACHEDIT_CUDA_TORCHAO=0" in cuda_plugin.kernel_report()["torchao_path"]


def test_torchao_path_quantizes_a_transformer_reversibly():
    pytest.importorskip("torchao")
    from cachedit.config import QuantConfig
    from cachedit.quant.linear import apply_quantization, remove_quantization
    from cachedit.testing.tiny import tiny_pipeline

    transformer = tiny_pipeline("flux").transformer
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, transformer.config.in_channels, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, transformer.config.joint_attention_dim, generator=g),
                  pooled_projections=torch.randn(1, transformer.config.pooled_projection_dim, generator=g),
                  timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                  return_dict=False)
    with torch.no_grad():
        ref = transformer(**inputs)[0]
        full = weight_bytes(transformer)
        swapped = apply_quantization(transformer, QuantConfig(scheme="int8"),
                                     cuda_quant.path_for(QuantSpec("int8", "row"), [(9, 0)], use_torchao=True))
        quantized = transformer(**inputs)[0]
        small = weight_bytes(transformer)
        remove_quantization(swapped)
        back = transformer(**inputs)[0]
    assert torch.equal(back, ref)  # the float linears came back
    assert small < 0.6 * full, (small, full)
    assert ((quantized - ref).norm() / ref.norm()).item() < 0.05


# -- compile options ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [CompileConfig(), CompileConfig(mode="reduce-overhead"),
                                    CompileConfig(dynamic=True), CompileConfig(options={"max_autotune": True})],
                         ids=["default", "reduce-overhead", "dynamic", "user-options"])
def test_compile_options_are_valid_torch_compile_arguments(backend, config):
    opts = manager().compile_options(backend, CompileTarget("transformer_block", "flux", config))
    assert opts.pop("fuse_qkv") is True  # the core's key (one q/k/v GEMM), popped before torch.compile
    assert set(opts) <= set(inspect.signature(torch.compile).parameters) - {"model"}
    assert opts["backend"] == "inductor" and not ("mode" in opts and "options" in opts)
    # inductor validates the option names the way torch.compile(backend="inductor") does
    torch._TorchCompileInductorWrapper(opts.get("mode"), opts.get("options"), opts.get("dynamic"))
    if config.mode == "reduce-overhead":
        assert opts["mode"] == "reduce-overhead" and "options" not in opts  # CUDA graphs only when asked
    elif not config.options:
        assert opts["options"]["triton.cudagraphs"] is False and opts["options"]["coordinate_descent_tuning"]
    assert opts["dynamic"] is bool(config.dynamic)


# -- NCCL communicator (its logic, run over gloo) ----------------------------------------------------------------
def _nccl_collectives(rank, world):
    comm = NcclCommunicator(None)
    x = torch.arange(24, dtype=torch.float32).reshape(4, 6) + 100 * rank
    out = {"gather0": comm.all_gather(x), "gather1": comm.all_gather(x, dim=1),
           "gather_fp8": comm.all_gather(x.to(torch.float8_e4m3fn), dim=1).float(),
           "uneven": comm.all_gather_uneven(x[: rank + 1], dim=0), "rs0": comm.reduce_scatter(x, dim=0), "rs1": comm.reduce_scatter(x, dim=1, op="max"),
           "sum": comm.all_reduce(x), "a2a": comm.all_to_all(x, scatter_dim=0, gather_dim=1)}
    comm.barrier()
    return out


def test_nccl_communicator_collectives_over_gloo():
    from cachedit.testing.distributed import run_distributed

    world = 2
    res = run_distributed(_nccl_collectives, world, dist_backend="gloo")
    xs = [torch.arange(24, dtype=torch.float32).reshape(4, 6) + 100 * r for r in range(world)]
    for r, got in enumerate(res):
        assert torch.equal(got["gather0"], torch.cat(xs, 0)) and torch.equal(got["gather1"], torch.cat(xs, 1))
        assert torch.equal(got["gather_fp8"], torch.cat([x.to(torch.float8_e4m3fn).float() for x in xs], 1))
        assert torch.equal(got["uneven"], torch.cat([x[: i + 1] for i, x in enumerate(xs)], 0))
        assert torch.equal(got["rs0"], sum(xs).chunk(world, 0)[r])
        assert torch.equal(got["rs1"], torch.maximum(*xs).chunk(world, 1)[r])
        assert torch.equal(got["sum"], sum(xs))
        assert torch.equal(got["a2a"], torch.cat([x.chunk(world, 0)[r] for x in xs], dim=1))


def test_nccl_barrier_names_this_ranks_device(monkeypatch, backend):
    seen = {}
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "barrier", lambda **kw: seen.update(kw))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    comm = manager().communicator(backend, None)
    assert isinstance(comm, NcclCommunicator)
    comm.barrier()
    assert seen == {"group": None, "device_ids": [3]}
    with pytest.raises(ValueError, match="not divisible by world size"):
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
        comm.reduce_scatter(torch.zeros(4, 2))


# -- a real DiT through the core's router ------------------------------------------------------------------------
def test_router_runs_a_real_dit_through_fa3(monkeypatch, backend):
    """The tiny FLUX pipeline in bfloat16 with its transformer's SDPA calls routed by the core's AttentionRouter
    to the fa3 kernel (fake FlashAttention-3), against the same pipeline on torch's CPU SDPA."""
    from cachedit.attention import AttentionRouter
    from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

    cuda = FakeCuda(monkeypatch, capabilities=((9, 0),))
    fa3 = make_flash_attn_interface(lambda: cuda.capability)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fa3)
    pipe = tiny_pipeline("flux").to(torch.bfloat16)
    kwargs = dict(tiny_call_kwargs("flux"), num_inference_steps=2)
    before = pipe("a photo of a cat", **kwargs).images
    router = AttentionRouter(manager().attention_kernels(backend))
    route_forward(monkeypatch, pipe.transformer, router)
    during = pipe("a photo of a cat", **dict(tiny_call_kwargs("flux"), num_inference_steps=2)).images
    assert router.calls["fa3"] > 0 and set(router.calls) == {"fa3"} and fa3.calls
    assert (during.double() - before.double()).abs().max().item() < 0.05


# -- torchao float8: what torchao refuses or skips runs on the plugin's own path, reported -----------------------
@pytest.fixture
def torchao_loaded():
    """torchao imported before `strict_gemms` patches torch._scaled_mm (its import registers ops on it)."""
    return pytest.importorskip("torchao.quantization")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16], ids=str)
def test_torchao_fp8_row_serves_every_dtype_and_reports_what_it_runs_itself(torchao_loaded, strict_gemms, dtype):
    """torchao asserts bfloat16 weights for PerRow (quant_api.py) and leaves layers whose K or N is not a multiple
    of 16 unquantized without a word; those layers run on the plugin's own _scaled_mm path, and say so."""
    from cachedit.config import QuantConfig
    from cachedit.quant.linear import QuantizedLinear, apply_quantization

    scaled_mm, _ = strict_gemms
    spec = QuantSpec("fp8", "row")
    path = cuda_quant.path_for(spec, [(9, 0)], use_torchao=True)
    x, w, b = _linear_case(dtype)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 40)).to(dtype)  # 40: not a multiple
    with torch.no_grad():
        model[0].weight.copy_(w), model[0].bias.copy_(b)
    swapped = apply_quantization(model, QuantConfig(scheme="fp8", granularity="row"), path)
    own = {name for name, m in model.named_children() if isinstance(m, QuantizedLinear)}
    assert own == ({"0", "1"} if dtype != torch.bfloat16 else {"1"})
    assert set(swapped.fallbacks) == own
    assert "multiple of 16" in swapped.fallbacks["1"]
    if dtype != torch.bfloat16:
        assert "bfloat16" in swapped.fallbacks["0"]
    y = model[0](x)
    ref = EmulatedLinearPath(spec).linear(x, *ref_quantize(w, "fp8", "row"), b)
    rel = ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    assert y.dtype == dtype and rel <= (_tol(dtype, rowwise_fp8=True) if dtype != torch.bfloat16 else 0.03), rel
    assert model[1](y).shape == (*x.shape[:-1], 40)
    assert all(call["fast_accum"] is False for call in scaled_mm.calls)


def test_fp8_fast_accumulation_is_off_unless_asked(torchao_loaded, strict_gemms, monkeypatch):
    scaled_mm, _ = strict_gemms
    x, w, b = _linear_case(torch.bfloat16)
    for env, want in ((None, False), ("1", True)):
        if env is not None:
            monkeypatch.setenv("CACHEDIT_CUDA_FP8_FAST_ACCUM", env)
        path = cuda_quant.path_for(QuantSpec("fp8", "tensor"), [(9, 0)], use_torchao=False)
        path.linear(x, *path.quantize_weight(w), b)
        assert scaled_mm.calls[-1]["fast_accum"] is want
        assert cuda_ao.config_for(QuantSpec("fp8", "row")).mm_config.use_fast_accum is want


def test_torchao_is_imported_only_when_its_path_quantizes():
    """Listing backends, the kernel report and choosing a quantized path import no torchao (its import prints
    "Failed to load ... _C_mxfp8" noise on machines without its CUDA extensions)."""
    pytest.importorskip("torchao")
    code = """
        import sys, torch
        torch.version.cuda = "12.8"
        torch.cuda.is_available = lambda: True
        torch.cuda.device_count = lambda: 1
        torch.cuda.get_device_capability = lambda i=None: (9, 0)
        import cachedit
        from cachedit.plugins import manager
        from cachedit.quant.spec import QuantSpec
        from cachedit_cuda import plugin
        cachedit.backends()
        plugin.kernel_report()
        path = manager().quantized_linear(manager().backends["cuda"], QuantSpec("fp8", "row"))
        assert type(path).__name__ == "TorchaoLinearPath", path
        print("torchao imported:", any(m.split(".")[0] == "torchao" for m in sys.modules))
    """
    from tests.conftest import run_python

    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert "torchao imported: False" in out.stdout
