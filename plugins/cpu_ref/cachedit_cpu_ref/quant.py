"""FP8 / INT8 emulation with the exact scaling of the real paths, computed in float64.

quantize -> (q, scale) and dequantize(q, scale) round-trip as the CUDA and NPU paths do;
`quantized_matmul` is what `torch._scaled_mm` (fp8) or an int8 GEMM with int32 accumulation
followed by scaling computes, done exactly here so the real paths can be checked against it.
"""

from __future__ import annotations

import torch

from cachedit.quant.spec import QDTYPE, QMAX, QuantizedLinearPath, QuantSpec

_EPS = 1e-12


def quantize(x: torch.Tensor, scheme: str, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization; scale is () per tensor or (rows, 1) per row (over the last dim)."""
    x32 = x.float()
    if granularity == "tensor":
        amax = x32.abs().amax()
    else:
        amax = x32.abs().amax(dim=-1, keepdim=True)
    scale = amax.clamp(min=_EPS) / QMAX[scheme]
    scaled = (x32 / scale).clamp(-QMAX[scheme], QMAX[scheme])
    q = scaled.round().to(torch.int8) if scheme == "int8" else scaled.to(QDTYPE[scheme])
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.double() * scale.double()).to(dtype)


def quantized_matmul(xq, x_scale, wq, w_scale, out_dtype, bias=None) -> torch.Tensor:
    """(M, K) x (N, K)^T with scales x_scale (() or (M, 1)) and w_scale (() or (N, 1))."""
    acc = xq.double() @ wq.double().t()  # exact: integer / fp8 products sum exactly in float64 here
    w_scale = w_scale.double().reshape(1, -1) if w_scale.dim() else w_scale.double()
    acc = acc * x_scale.double() * w_scale
    if bias is not None:
        acc = acc + bias.double()
    return acc.to(out_dtype)


class EmulatedLinearPath(QuantizedLinearPath):
    name = "cpu_ref_emulated"

    def quantize_weight(self, weight):
        return quantize(weight, self.spec.scheme, self.spec.granularity)

    def linear(self, x, qweight, w_scale, bias):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.spec.weight_only:
            w = dequantize(qweight, w_scale, x.dtype)
            y = torch.nn.functional.linear(x2, w, bias)
        else:
            xq, x_scale = quantize(x2, self.spec.scheme, self.spec.granularity)
            y = quantized_matmul(xq, x_scale, qweight, w_scale, x.dtype, bias)
        return y.reshape(*shape[:-1], y.shape[-1])


def path_for(spec: QuantSpec) -> EmulatedLinearPath:
    return EmulatedLinearPath(spec)
