"""The torchao path: when torchao is installed, quantized linears are torchao's own.

torchao keeps the quantized weight as a tensor subclass on an `nn.Linear` (`quantize_`), and its
dispatch picks the GEMM (`torch._scaled_mm` / fbgemm / Triton for float8, `_int_mm` for int8)
and fuses the activation quantization under torch.compile, which our plain-tensor paths do not.
Each `QuantSpec` maps to one torchao config with the same scaling: symmetric, dynamic
activations, per tensor or per row. torchao's float8 dynamic config asserts a GPU of compute
capability 8.9+ itself; its int8 and weight-only configs also run on a CPU, which is how the
tests run this path for real.

Set `CACHEDIT_CUDA_TORCHAO=0` to use the plugin's own paths even when torchao is installed.
"""

from __future__ import annotations

import importlib.metadata
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
    try:
        import torchao.quantization  # noqa: F401
    except Exception as exc:  # a broken install must not break the plugin
        return f"import torchao.quantization failed: {exc!r}"
    return ""


def config_for(spec: QuantSpec):
    """The torchao config that quantizes like `spec`."""
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig,
                                      Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, PerRow, PerTensor)

    granularity = PerRow() if spec.granularity == "row" else PerTensor()
    common = dict(granularity=granularity, set_inductor_config=False)  # compile settings are the plugin's
    if spec.weight_only:
        cls = Float8WeightOnlyConfig if spec.scheme == "fp8" else Int8WeightOnlyConfig
    else:
        cls = Float8DynamicActivationFloat8WeightConfig if spec.scheme == "fp8" else Int8DynamicActivationInt8WeightConfig
    return cls(**common)


class TorchaoLinearPath(QuantizedLinearPath):
    """Quantized linears as torchao builds them: an `nn.Linear` whose weight is torchao's subclass."""

    name = "cuda_torchao"

    def quantize_module(self, linear: nn.Linear) -> nn.Module:
        """A new linear sharing nothing mutable with `linear` (which is kept to restore it)."""
        from torchao.quantization import quantize_

        new = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        quantize_(new, config_for(self.spec))
        return new

    def quantize_weight(self, weight: torch.Tensor):
        raise NotImplementedError(f"{self.name} quantizes whole modules (quantize_module)")
