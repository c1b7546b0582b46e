"""The torchao path: when torchao is installed, quantized linears are torchao's own.

torchao keeps the quantized weight as a tensor subclass on an `nn.Linear` (`quantize_`), and its
dispatch picks the GEMM (`torch._scaled_mm` / fbgemm / Triton for float8, `_int_mm` for int8)
and fuses the activation quantization under torch.compile, which our plain-tensor paths do not.
Each `QuantSpec` maps to one torchao config with the same scaling: symmetric, dynamic
activations, per tensor or per row. torchao's float8 dynamic config asserts a GPU of compute
capability 8.9+ itself; its int8 and weight-only configs also run on a CPU, which is how the
tests run this path for real.

What torchao does not take runs on the plugin's own path for the same spec (`quant.py`), and
`summary()["quantize"]["fallbacks"]` names each such layer and why: float8 layers whose K or N is
not a multiple of 16 (torchao would leave them unquantized without a word), and per-row float8 on
float16/float32 weights (torchao asserts bfloat16 for PerRow). Fast accumulation in the float8
GEMM is off unless `CACHEDIT_CUDA_FP8_FAST_ACCUM=1` (torchao's default is on).

torchao is imported only when a path quantizes (its import loads CUDA extensions and prints
"Failed to load ..." where they do not fit); `usable()` asks the installed metadata only.
Set `CACHEDIT_CUDA_TORCHAO=0` to use the plugin's own paths even when torchao is installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import torch
import torch.nn as nn

from cachedit.quant.spec import QuantizedLinearPath, QuantSpec

MIN_VERSION = (0, 13)  # the configs and v2 tensor subclasses used here


def version() -> str | None:
    try:
        return importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        return None


def usable() -> str:
    """Why the torchao path is not used ("" when it is)."""
    if os.environ.get("CACHEDIT_CUDA_TORCHAO", "1") == "0":
        return "disabled by CACHEDIT_CUDA_TORCHAO=0"
    found = version()
    if found is None:
        return "torchao is not installed"
    parts = tuple(int(p) for p in found.split("+")[0].split(".")[:2] if p.isdigit())
    if parts < MIN_VERSION:
        return f"torchao {found} is older than {'.'.join(map(str, MIN_VERSION))}"
    if importlib.util.find_spec("torchao") is None:
        return f"torchao {found} is installed but not importable"
    return ""


def fast_accum() -> bool:
    """Fast (lower-precision) accumulation in float8 GEMMs: off unless CACHEDIT_CUDA_FP8_FAST_ACCUM=1."""
    return os.environ.get("CACHEDIT_CUDA_FP8_FAST_ACCUM", "0") == "1"


def config_for(spec: QuantSpec):
    """The torchao config that quantizes like `spec`."""
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Float8MMConfig,
                                      Float8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                      Int8WeightOnlyConfig, PerRow, PerTensor)

    granularity = PerRow() if spec.granularity == "row" else PerTensor()
    common = dict(granularity=granularity, set_inductor_config=False)  # compile settings are the plugin's
    if spec.weight_only:
        cls = Float8WeightOnlyConfig if spec.scheme == "fp8" else Int8WeightOnlyConfig
    elif spec.scheme == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(mm_config=Float8MMConfig(use_fast_accum=fast_accum()),
                                                         **common)
    else:
        cls = Int8DynamicActivationInt8WeightConfig
    return cls(**common)


FP8_MULTIPLE = 16  # torchao's _fp8_mm_compat: K and N multiples of 16, else the layer is left as it is


class TorchaoLinearPath(QuantizedLinearPath):
    """Quantized linears as torchao builds them: an `nn.Linear` whose weight is torchao's subclass; the
    layers torchao would refuse or skip run on `fallback`, the plugin's own path for the same spec."""

    name = "cuda_torchao"

    def __init__(self, spec: QuantSpec, fallback: QuantizedLinearPath) -> None:
        super().__init__(spec)
        self.fallback = fallback

    def declines(self, linear: nn.Linear) -> str:
        if self.spec.scheme != "fp8":
            return ""
        if self.spec.weight_only:
            return ""
        n, k = linear.weight.shape
        if n % FP8_MULTIPLE or k % FP8_MULTIPLE:
            return (f"torchao leaves float8 layers with K or N not a multiple of {FP8_MULTIPLE} unquantized "
                    f"(K={k}, N={n}); runs on {self.fallback.name}")
        if self.spec.granularity == "row" and linear.weight.dtype != torch.bfloat16:
            return (f"torchao's per-row float8 takes bfloat16 weights only, this one is {linear.weight.dtype}; "
                    f"runs on {self.fallback.name}")
        return ""

    def quantize_module(self, linear: nn.Linear) -> nn.Module | None:
        """A new linear sharing nothing mutable with `linear` (which is kept to restore it); None where
        torchao would not quantize it (`declines`)."""
        if self.declines(linear):
            return None
        from torchao.quantization import quantize_

        new = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        quantize_(new, config_for(self.spec))
        return new

    def quantize_weight(self, weight: torch.Tensor):
        return self.fallback.quantize_weight(weight)

    def linear(self, x, qweight, w_scale, bias):
        return self.fallback.linear(x, qweight, w_scale, bias)
