"""A CUDA machine on a CPU-only torch: build flags, devices, torch's CUDA SDPA backends, _scaled_mm / _int_mm.

Tensors stay on the CPU; what the fakes check is what the CUDA code paths of torch 2.13 check.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.attention
from torch.nn.attention import SDPBackend

from tests.fakes.reference import VendorError, vendor_check, attention64


CUDNN_MASKED = -65504.0  # what torch's SDPA gives cuDNN for masked-out positions instead of -inf


class FakeCuda:
    """Monkeypatch torch so it looks like a CUDA build with `capabilities` (one entry per device)."""

    def __init__(self, monkeypatch, *, cuda="12.8", available=True, capabilities=((9, 0),), cudnn=91002,
                 flash=True):
        self.capabilities = [tuple(c) for c in capabilities]
        self.current = 0
        monkeypatch.setattr(torch.version, "cuda", cuda)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(available))
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(self.capabilities) if available else 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", self.get_device_capability)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: cudnn is not None)
        monkeypatch.setattr(torch.backends.cudnn, "version", lambda: cudnn)
        monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: bool(flash))

    def get_device_capability(self, device=None):
        index = self.current if device is None else (device.index if isinstance(device, torch.device) else device)
        index = self.current if index is None else int(index)
        vendor_check(0 <= index < len(self.capabilities), f"Invalid device id {index}")
        return self.capabilities[index]

    @property
    def capability(self):
        return self.capabilities[self.current]


# -- torch._scaled_mm / torch._int_mm with their CUDA checks -------------------------------------------------
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def strict_scaled_mm(real, capability):
    """torch._scaled_mm as the CUDA path checks it (aten/src/ATen/native/cuda/ScaledBlas.cpp and the meta
    registration), then the real CPU op. Row-wise scaling is held to bfloat16 output: the one output
    dtype every torch release accepts for it (CUTLASS f8f8bf16_rowwise)."""

    def scaled_mm(mat1, mat2, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
        vendor_check(capability() >= (8, 9), "torch._scaled_mm is only supported on CUDA devices with compute "
                                       "capability >= 9.0 or 8.9")
        vendor_check(mat1.dim() == 2 and mat2.dim() == 2, "mat1 and mat2 must be matrices")
        vendor_check(mat1.shape[1] == mat2.shape[0], "mat1 and mat2 shapes cannot be multiplied")
        vendor_check(mat1.dtype in _FP8 and mat2.dtype in _FP8, "Expected both inputs to be fp8 types")
        vendor_check(not (mat1.dtype == mat2.dtype == torch.float8_e5m2),
               "Multiplication of two Float8_e5m2 matrices is not supported")
        vendor_check(mat1.stride(0) > mat1.stride(1) and mat1.stride(1) == 1, f"self must be row_major, got stride "
                                                                         f"{mat1.stride()}")
        vendor_check(mat2.stride(0) == 1 and mat2.stride(1) > 1, f"mat2 must be col_major, got stride {mat2.stride()}")
        m, k = mat1.shape
        n = mat2.shape[1]
        vendor_check(k % 16 == 0, f"Expected trailing dimension of mat1 to be divisible by 16 but got {tuple(mat1.shape)}")
        vendor_check(mat2.shape[0] % 16 == 0 and n % 16 == 0, f"mat2 shape {tuple(mat2.shape)} must be divisible by 16")
        tensorwise = scale_a.numel() == 1 and scale_b.numel() == 1
        if tensorwise:
            vendor_check(scale_a.dtype == torch.float32 and scale_b.dtype == torch.float32,
                   "For TensorWise scaling, scales should be float and singletons")
        else:
            rowwise = (scale_a.dtype == scale_b.dtype == torch.float32 and tuple(scale_a.shape) == (m, 1)
                       and tuple(scale_b.shape) == (1, n) and scale_a.is_contiguous() and scale_b.is_contiguous())
            vendor_check(rowwise, f"Invalid scaling configuration: scale_a should be ({m}, 1) and scale_b (1, {n}), float, "
                            f"contiguous; got {tuple(scale_a.shape)} {scale_a.dtype}, {tuple(scale_b.shape)} "
                            f"{scale_b.dtype}")
            vendor_check(out_dtype == torch.bfloat16, "Only bf16 high precision output types are supported for row-wise "
                                                "scaling.")
        out = mat1.dtype if out_dtype is None else out_dtype
        if bias is not None:
            vendor_check(bias.numel() == n, f"Bias must be size {n} but got {bias.numel()}")
            vendor_check(out != torch.float32, "Bias is not supported when out_dtype is set to Float32")
            vendor_check(bias.dtype in (torch.bfloat16, torch.float16),
                   f"Bias must be BFloat16 or Half, but got {bias.dtype}")
            vendor_check(bias.dtype == out, f"Bias must be {out} to compute {out} output, but got {bias.dtype}")
        scaled_mm.calls.append({"rowwise": not tensorwise, "out_dtype": out, "bias": bias is not None,
                                "fast_accum": use_fast_accum})
        return real(mat1, mat2, scale_a, scale_b, bias=bias, scale_result=scale_result, out_dtype=out_dtype,
                    use_fast_accum=use_fast_accum)

    scaled_mm.calls = []
    return scaled_mm


def strict_int_mm(real):
    """torch._int_mm with the checks of _int_mm_out_cuda (aten/src/ATen/native/cuda/Blas.cpp)."""

    def int_mm(a, b):
        vendor_check(a.dim() == 2 and b.dim() == 2, "Expected self and mat2 to be of dimension 2")
        vendor_check(a.shape[0] > 16, f"self.size(0) needs to be greater than 16, but got {a.shape[0]}")
        vendor_check(a.shape[1] > 0 and a.shape[1] % 8 == 0,
               f"self.size(1) needs to be greater than 0 and a multiple of 8, but got {a.shape[1]}")
        vendor_check(a.shape[1] == b.shape[0], "self.size(1) needs to match mat2.size(0)")
        vendor_check(b.shape[1] > 0 and b.shape[1] % 8 == 0,
               f"mat2.size(1) needs to be greater than 0 and a multiple of 8, but got {b.shape[1]}")
        vendor_check(a.dtype == torch.int8 and b.dtype == torch.int8, "expected int8 operands")
        int_mm.calls.append(tuple(a.shape))
        return real(a, b)

    int_mm.calls = []
    return int_mm


# -- torch's CUDA SDPA backends --------------------------------------------------------------------------------
class FakeTorchSDPA:
    """sdpa_kernel + F.scaled_dot_product_attention + the three aten ops returning the LSE, with the
    constraints of torch's sdp_utils.cpp for the pinned backend on a device of capability `cuda.capability`."""

    def __init__(self, monkeypatch, cuda: FakeCuda):
        self.cuda = cuda
        self.active: list[list] = []
        self.calls: list[tuple] = []
        monkeypatch.setattr(torch.nn.attention, "sdpa_kernel", self.sdpa_kernel)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", self.scaled_dot_product_attention)
        monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention", self.flash_op)
        monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", self.cudnn_op)
        monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", self.efficient_op)

    @contextlib.contextmanager
    def sdpa_kernel(self, backends, set_priority=False):
        backends = list(backends) if isinstance(backends, (list, tuple)) else [backends]
        vendor_check(all(isinstance(b, SDPBackend) for b in backends), "sdpa_kernel takes SDPBackend members")
        self.active.append(backends)
        try:
            yield
        finally:
            self.active.pop()

    # constraints shared by the F.sdpa path and the aten ops
    def _constraints(self, backend, q, k, v, mask, is_causal, gqa_ok):
        cap = self.cuda.capability
        vendor_check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, "expected (batch, heads, seq, dim) inputs")
        vendor_check(q.dtype == k.dtype == v.dtype, "query, key and value must have the same dtype")
        vendor_check(q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "last dim stride must be 1")
        vendor_check(q.shape[0] == k.shape[0] == v.shape[0], "batch sizes must match")
        if k.shape[1] != q.shape[1]:
            vendor_check(gqa_ok and q.shape[1] % k.shape[1] == 0,
                   "key/value heads differ from query heads (needs enable_gqa=True and a divisor)")
        d, dv = q.shape[-1], v.shape[-1]
        if backend == SDPBackend.FLASH_ATTENTION:
            vendor_check((8, 0) <= cap <= (12, 1), f"Flash attention only supports [sm80, sm121], got sm{cap}")
            vendor_check(q.dtype in (torch.float16, torch.bfloat16), f"flash: dtype {q.dtype} unsupported")
            vendor_check(mask is None, "flash attention does not support attn_mask")
            vendor_check(d == k.shape[-1] == dv and d <= 256, "Flash attention requires equal head dims <= 256")
            vendor_check(not is_causal or q.shape[2] == k.shape[2],
                   "Flash attention does not support the is_causal flag when seqlen_q != seqlen_k")
        elif backend == SDPBackend.EFFICIENT_ATTENTION:
            vendor_check((5, 0) <= cap <= (12, 1), f"Mem Efficient Attention only supports [sm50, sm121], got sm{cap}")
            dtypes = (torch.float16, torch.float32) + ((torch.bfloat16,) if cap >= (8, 0) else ())
            vendor_check(q.dtype in dtypes, f"efficient: dtype {q.dtype} unsupported on sm{cap}")
            align = 8 if q.dtype in (torch.float16, torch.bfloat16) else 4
            vendor_check(d == k.shape[-1] and d % align == 0 and dv % align == 0,
                   f"Mem efficient attention requires last dimension of inputs to be divisible by {align}")
        elif backend == SDPBackend.CUDNN_ATTENTION:
            vendor_check((8, 0) <= cap <= (12, 1), f"cuDNN MHA only supports [sm80, sm121], got sm{cap}")
            vendor_check(self.cuda_cudnn() >= 90000, "cuDNN SDPA needs cuDNN >= 9.0")
            vendor_check(q.dtype in (torch.float16, torch.bfloat16), f"cudnn: dtype {q.dtype} unsupported")
            vendor_check(d <= 128 and dv <= 128, "head_dim should be no more than 128")
            vendor_check(d % 8 == 0 and dv % 8 == 0, "head_dim should be a multiple of 8")
            vendor_check(k.shape[2] != 1, "cudnn SDPA does not support key/value sequence length 1")
        else:
            raise VendorError(f"fake does not model backend {backend}")

    def cuda_cudnn(self):
        return torch.backends.cudnn.version() or 0

    def scaled_dot_product_attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False):
        vendor_check(self.active and len(self.active[-1]) == 1, "the fake expects one backend pinned by sdpa_kernel")
        backend = self.active[-1][0]
        vendor_check(not (is_causal and attn_mask is not None),
               "_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True")
        vendor_check(dropout_p == 0.0, "inference: dropout must be 0")
        self._constraints(backend, query, key, value, attn_mask, is_causal, gqa_ok=enable_gqa)
        self.calls.append(("sdpa", backend.name, attn_mask is not None, is_causal))
        keep = bias = None
        if attn_mask is not None:
            keep, bias = (attn_mask, None) if attn_mask.dtype == torch.bool else (None, attn_mask)
            if backend == SDPBackend.CUDNN_ATTENTION:
                self._check_cudnn_bias(bias)
                if keep is not None:  # torch hands cuDNN a bool mask as a -65504 bias (sdp_utils / attention.cu)
                    keep, bias = None, torch.zeros(keep.shape, dtype=query.dtype).masked_fill(~keep, CUDNN_MASKED)
        out, _ = attention64(query, key, value, scale=scale, keep=keep, bias=bias,
                             causal="top_left" if is_causal else None)
        return out.to(query.dtype)

    def _check_bias(self, bias, q, k, align):
        if bias is None:
            return None
        vendor_check(bias.dtype == q.dtype, f"attn_bias must have the query's dtype {q.dtype}, got {bias.dtype}")
        vendor_check(tuple(bias.shape) == (q.shape[0], q.shape[1], q.shape[2], k.shape[2]),
               f"attn_bias must be (B, H, Sq, Sk), got {tuple(bias.shape)}")
        vendor_check(all(s % align == 0 for s in bias.stride()[:-1]) and bias.stride(-1) == 1,
               f"attn_bias is not correctly aligned (strides {bias.stride()}, alignment {align})")
        return bias

    def _aten(self, backend, q, k, v, bias, dropout_p, is_causal, scale):
        vendor_check(dropout_p == 0.0, "inference: dropout must be 0")
        vendor_check(not is_causal or q.shape[2] == k.shape[2], "fake: non-square causal is not modelled for aten ops")
        self._constraints(backend, q, k, v, bias, is_causal, gqa_ok=False)
        out, lse = attention64(q, k, v, scale=scale, bias=bias, causal="top_left" if is_causal else None)
        self.calls.append(("aten", backend.name, bias is not None, is_causal))
        return out.to(q.dtype), lse.float()

    def flash_op(self, query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
        vendor_check(query.shape[-1] % 8 == 0, "flash kernel: head dimension must be a multiple of 8")
        out, lse = self._aten(SDPBackend.FLASH_ATTENTION, query, key, value, None, dropout_p, is_causal, scale)
        b, h, lq, _ = query.shape
        return (out, lse, None, None, lq, key.shape[2], torch.empty(2), torch.empty(()), torch.empty(0))

    @staticmethod
    def _check_cudnn_bias(bias):
        vendor_check(bias is None or not torch.isneginf(bias).any(),
               f"fake cuDNN: -inf in the attention bias (torch itself gives cuDNN {CUDNN_MASKED} to avoid a cuDNN "
               "issue with -inf)")

    def cudnn_op(self, query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False,
                 return_debug_mask=False, *, scale=None):
        bias = self._check_bias(attn_bias, query, key, 1)
        self._check_cudnn_bias(bias)
        out, lse = self._aten(SDPBackend.CUDNN_ATTENTION, query, key, value, bias, dropout_p, is_causal, scale)
        lse = lse.unsqueeze(-1) if compute_log_sumexp else torch.empty(0)
        return (out, lse, None, None, query.shape[2], key.shape[2], torch.empty(()), torch.empty(()), None)

    def efficient_op(self, query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *,
                     scale=None):
        bias = self._check_bias(attn_bias, query, key, 8)
        out, lse = self._aten(SDPBackend.EFFICIENT_ATTENTION, query, key, value, bias, dropout_p, is_causal, scale)
        # Rows with no key to attend to: the kernel's LSE there is not documented; the fake reports 0 (the reading
        # under which a Ring merge silently shrinks the output), not -inf.
        lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        if compute_log_sumexp:  # padded to a multiple of 32 along seq_q; the padding is garbage
            b, h, lq = lse.shape
            padded = torch.full((b, h, math.ceil(lq / 32) * 32), float("nan"))
            padded[..., :lq] = lse
            lse = padded
        else:
            lse = torch.empty(query.shape[0], query.shape[1], 0)
        return out, lse, torch.empty(()), torch.empty(())
