"""Quantized linears on NVIDIA GPUs, with the scaling convention of `cachedit.quant.spec`.

- fp8 (W8A8): `torch._scaled_mm` on float8_e4m3fn operands, compute capability >= 8.9. Weights are
  quantized once to a row-major (N, K) tensor, so `qweight.t()` is the column-major (K, N) operand
  `_scaled_mm` requires, without a copy; activations are quantized per call (dynamic). Scales are
  float32: per tensor (); per row scale_a (M, 1) and scale_b (1, N). K and N must be multiples of 16
  (cuBLASLt). The output has the input's dtype. `_scaled_mm` takes a bias only for float16/bfloat16
  output, in the output's dtype; with float32 output the bias is added after the matmul. Row-wise
  scaling asks `_scaled_mm` for bfloat16 output (the output dtype every torch release with row-wise
  scaling accepts; recent ones also take float16/float32 there) and casts to the input's dtype.
- int8 (W8A8): `torch._int_mm` (int32 accumulation, cuBLASLt), then the two scales and the bias in
  float32. K and N must be multiples of 8; cuBLASLt needs more than 16 rows, so fewer rows are padded
  with zeros and cut off again.
- A layer whose K or N the GEMM cannot take runs the same W8A8 math (quantized activations and
  weights, float32 accumulation, then the scales) through a plain float32 matmul: a declared
  fallback, exact to the emulation, not faster.
- Fast accumulation in `_scaled_mm` is off (exact float32 accumulation) unless
  `CACHEDIT_CUDA_FP8_FAST_ACCUM=1`.
- weight-only (fp8 or int8): one-byte weights dequantized to the input's dtype before F.linear (saves
  weight memory, not compute).

When torchao is installed (and `CACHEDIT_CUDA_TORCHAO` is not "0"), every supported scheme runs
through torchao's own quantized linears instead (`ao.py`); the capability rules above still decide
what is offered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cachedit.quant.spec import QDTYPE, QMAX, QuantizedLinearPath, QuantSpec

from . import ao
from .device import describe

FP8_MIN_CAPABILITY = (8, 9)  # torch._scaled_mm: "compute capability >= 9.0 or 8.9"
INT8_MIN_CAPABILITY = (8, 0)
INT_MM_MIN_ROWS = 17  # cuBLASLt int8 GEMM: "self.size(0) needs to be greater than 16"
_EPS = 1e-12


def quantize(x: torch.Tensor, scheme: str, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization, scale = amax / qmax in float32: () per tensor, (rows, 1) per row."""
    x32 = x.float()
    amax = x32.abs().amax() if granularity == "tensor" else x32.abs().amax(dim=-1, keepdim=True)
    scale = amax.clamp(min=_EPS) / QMAX[scheme]
    scaled = (x32 / scale).clamp(-QMAX[scheme], QMAX[scheme])
    q = scaled.round().to(torch.int8) if scheme == "int8" else scaled.to(QDTYPE[scheme])
    return q, scale


class _Path(QuantizedLinearPath):
    multiple = 1  # K and N must be multiples of this for the GEMM kernel

    def quantize_weight(self, weight):
        if weight.dim() != 2:
            raise ValueError(f"{self.name}: expects a (out_features, in_features) weight, got {tuple(weight.shape)}")
        q, scale = quantize(weight, self.spec.scheme, self.spec.granularity)
        return q.contiguous(), scale

    def gemm_fits(self, qweight: torch.Tensor) -> bool:
        n, k = qweight.shape
        return not (n % self.multiple or k % self.multiple)

    def _linear2d(self, x2, qweight, w_scale, bias):
        raise NotImplementedError

    def _matmul_fallback(self, x2, qweight, w_scale, bias):
        """The same W8A8 math without the GEMM kernel's shape rules: quantized activations times quantized
        weights, accumulated in float32, then both scales and the bias."""
        xq, x_scale = quantize(x2, self.spec.scheme, self.spec.granularity)
        w_row = w_scale.reshape(1, -1) if w_scale.dim() else w_scale
        y = (xq.float() @ qweight.float().t()) * x_scale * w_row
        if bias is not None:
            y = y + bias.float()
        return y.to(x2.dtype)

    def linear(self, x, qweight, w_scale, bias):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        fits = self.gemm_fits(qweight)
        y = (self._linear2d if fits else self._matmul_fallback)(x2, qweight, w_scale, bias)
        return y.reshape(*shape[:-1], y.shape[-1])


class ScaledMMLinearPath(_Path):
    """FP8 W8A8 through torch._scaled_mm."""

    name = "cuda_fp8_scaled_mm"
    multiple = 16

    def _linear2d(self, x2, qweight, w_scale, bias):
        out_dtype = x2.dtype
        xq, x_scale = quantize(x2, "fp8", self.spec.granularity)
        if self.spec.granularity == "row":
            mm_dtype = torch.bfloat16
            scale_b = w_scale.reshape(1, -1)
        else:
            mm_dtype = out_dtype
            scale_b = w_scale
        fused_bias = bias is not None and mm_dtype in (torch.float16, torch.bfloat16)
        y = torch._scaled_mm(xq, qweight.t(), scale_a=x_scale, scale_b=scale_b,
                             bias=bias.to(mm_dtype) if fused_bias else None, out_dtype=mm_dtype,
                             use_fast_accum=ao.fast_accum())
        y = y.to(out_dtype)
        if bias is not None and not fused_bias:
            y = y + bias.to(out_dtype)
        return y


class IntMMLinearPath(_Path):
    """INT8 W8A8 through torch._int_mm, int32 accumulation, float32 epilogue."""

    name = "cuda_int8_int_mm"
    multiple = 8

    def _linear2d(self, x2, qweight, w_scale, bias):
        m = x2.shape[0]
        xq, x_scale = quantize(x2, "int8", self.spec.granularity)
        if m < INT_MM_MIN_ROWS:
            xq = torch.cat([xq, xq.new_zeros(INT_MM_MIN_ROWS - m, xq.shape[1])])
        acc = torch._int_mm(xq, qweight.t())[:m]
        w_row = w_scale.reshape(1, -1) if w_scale.dim() else w_scale
        y = acc.float() * x_scale * w_row
        if bias is not None:
            y = y + bias.float()
        return y.to(x2.dtype)


class DequantLinearPath(_Path):
    """Weight-only: one-byte weights, dequantized to the activation dtype for F.linear."""

    name = "cuda_weight_only_dequant"

    def gemm_fits(self, qweight):
        return True

    def _linear2d(self, x2, qweight, w_scale, bias):
        w = (qweight.float() * w_scale.float()).to(x2.dtype)
        return F.linear(x2, w, None if bias is None else bias.to(x2.dtype))


def unsupported(spec: QuantSpec, caps: list[tuple[int, int]]) -> str:
    """Why `spec` has no path on devices with `caps` ("" when it has one)."""
    if spec.weight_only:
        return ""
    if spec.scheme == "fp8":
        if not hasattr(torch, "_scaled_mm"):
            return "this torch has no torch._scaled_mm"
        if not caps or min(caps) < FP8_MIN_CAPABILITY:
            return f"fp8 W8A8 (torch._scaled_mm) needs compute capability >= 8.9; visible: {describe(caps)}"
        return ""
    if spec.scheme == "int8":
        if not hasattr(torch, "_int_mm"):
            return "this torch has no torch._int_mm"
        if not caps or min(caps) < INT8_MIN_CAPABILITY:
            return f"int8 W8A8 (torch._int_mm) is offered from compute capability 8.0; visible: {describe(caps)}"
        return ""
    return f"unknown scheme {spec.scheme!r}"


def path_for(spec: QuantSpec, caps: list[tuple[int, int]], use_torchao: bool | None = None) -> QuantizedLinearPath | None:
    """The path for `spec`; torchao's when `use_torchao` (None: whenever `ao.usable()`)."""
    if unsupported(spec, caps):
        return None
    if spec.weight_only:
        own = DequantLinearPath(spec)
    else:
        own = ScaledMMLinearPath(spec) if spec.scheme == "fp8" else IntMMLinearPath(spec)
    if use_torchao or (use_torchao is None and not ao.usable()):
        return ao.TorchaoLinearPath(spec, fallback=own)
    return own


def torchao_version() -> str | None:
    """torchao's version when installed."""
    return ao.version()
