"""INT8 linears on Ascend NPUs, with the scaling convention of `cachedit.quant.spec`.

As torch_npu 2.13.0 documents them (torch_npu/_op_plugin_docs.py, Atlas A2/A3):

- W8A8: `npu_quant_matmul(x1 int8 (M, K), x2 int8 (K, N), scale, *, offset=None,
  pertoken_scale=None, bias=None, output_dtype=None)`, scale float32 of shape (1,) or (N,),
  pertoken_scale float32 (M,), output_dtype float16 or bfloat16 (None would give int8); with a
  pertoken_scale, a float32 bias is accepted for both output dtypes. The weight is stored (N, K) and
  passed as the transposed view `qweight.t()`, as the docs' examples do. Per-row activation scales
  come from `npu_dynamic_quant(x)` (per-token symmetric: scale = rowmax(|x|) / 127, y = round(x /
  scale), x float16/bfloat16, scale float32 of x's shape without the last dim). Per-tensor
  activation scales are computed here and passed as a constant pertoken_scale.
- weight-only: `npu_weight_quant_batchmatmul(x, weight (K, N) int8, antiquant_scale (N,) or (1,),
  bias=...)`, x float16/bfloat16, antiquant_scale in x's dtype, bias float32 for bfloat16 x and
  float16 for float16 x; the output has x's dtype.
- float32 activations are computed in bfloat16 (neither op takes float32 input or output) and the
  result is cast back. K and N are at most 65535. FP8 is not served (Ascend 950 only).
"""

from __future__ import annotations

import torch

from cachedit.quant.spec import QMAX, QuantizedLinearPath, QuantSpec

from .device import why_not

MAX_DIM = 65535
_EPS = 1e-12
_HALF = (torch.float16, torch.bfloat16)


def quantize_int8(x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    x32 = x.float()
    amax = x32.abs().amax() if granularity == "tensor" else x32.abs().amax(dim=-1, keepdim=True)
    scale = amax.clamp(min=_EPS) / QMAX["int8"]
    return (x32 / scale).clamp(-QMAX["int8"], QMAX["int8"]).round().to(torch.int8), scale


class _NpuPath(QuantizedLinearPath):
    def __init__(self, spec: QuantSpec, torch_npu) -> None:
        super().__init__(spec)
        self.torch_npu = torch_npu

    def quantize_weight(self, weight):
        n, k = weight.shape
        if n > MAX_DIM or k > MAX_DIM:
            raise ValueError(f"{self.name}: K and N must be at most {MAX_DIM}, got weight ({n}, {k})")
        q, scale = quantize_int8(weight, self.spec.granularity)
        return q.contiguous(), scale

    def linear(self, x, qweight, w_scale, bias):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        compute = x2 if x2.dtype in _HALF else x2.to(torch.bfloat16)
        y = self._linear2d(compute, qweight, w_scale, bias).to(x.dtype)
        return y.reshape(*shape[:-1], y.shape[-1])


class QuantMatmulW8A8Path(_NpuPath):
    name = "npu_w8a8_quant_matmul"

    def _linear2d(self, x2, qweight, w_scale, bias):
        npu = self.torch_npu
        if self.spec.granularity == "row":
            xq, x_scale = npu.npu_dynamic_quant(x2)
        else:
            xq, s = quantize_int8(x2, "tensor")
            x_scale = s.reshape(1).expand(x2.shape[0]).contiguous()
        return npu.npu_quant_matmul(xq, qweight.t(), w_scale.reshape(-1).float(),
                                    pertoken_scale=x_scale.reshape(-1).float(),
                                    bias=None if bias is None else bias.float(), output_dtype=x2.dtype)


class WeightQuantMatmulPath(_NpuPath):
    name = "npu_weight_only_int8"

    def _linear2d(self, x2, qweight, w_scale, bias):
        if bias is not None:
            bias = bias.to(torch.float16 if x2.dtype == torch.float16 else torch.float32)
        return self.torch_npu.npu_weight_quant_batchmatmul(x2, qweight.t(), w_scale.reshape(-1).to(x2.dtype),
                                                           bias=bias)


def unsupported(spec: QuantSpec, torch_npu, device_name: str) -> str:
    if spec.scheme != "int8":
        return f"{spec.scheme} is not served on Ascend (torch_npu's FP8 matmuls need Ascend 950)"
    needed = "npu_weight_quant_batchmatmul" if spec.weight_only else "npu_quant_matmul"
    for op in (needed,) if spec.weight_only else (needed, "npu_dynamic_quant"):
        if not hasattr(torch_npu, op):
            return f"this torch_npu has no {op}"
    if why := why_not(device_name):
        return (f"{why}; Atlas inference cards take no pertoken_scale in npu_quant_matmul and only float16 in "
                "npu_weight_quant_batchmatmul")
    return ""


def path_for(spec: QuantSpec, torch_npu, device_name: str) -> QuantizedLinearPath | None:
    if unsupported(spec, torch_npu, device_name):
        return None
    return (WeightQuantMatmulPath if spec.weight_only else QuantMatmulW8A8Path)(spec, torch_npu)
