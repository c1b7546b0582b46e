"""What a quantized linear path is asked to do, and the interface it answers with.

Scaling convention every backend follows (it is what CUDA's `torch._scaled_mm` and NPU int8
matmuls consume): symmetric, dynamic for activations, scale = amax / qmax, with qmax 448 for
float8_e4m3fn and 127 for int8. "tensor" granularity has one scale per tensor; "row" has one
per activation row (shape (M, 1)) and one per weight output channel (shape (N, 1), applied as
(1, N)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QMAX = {"fp8": 448.0, "int8": 127.0}
QDTYPE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


@dataclass(frozen=True)
class QuantSpec:
    scheme: str  # "fp8" | "int8"
    granularity: str  # "tensor" | "row"
    weight_only: bool = False

    @classmethod
    def from_config(cls, config) -> "QuantSpec":
        return cls(config.scheme, config.granularity, config.weight_only)


class QuantizedLinearPath:
    """A backend's way to run `spec`: quantize weights once, then run linears on them."""

    name = "abstract"

    def __init__(self, spec: QuantSpec) -> None:
        self.spec = spec

    def quantize_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, K) weight -> (quantized weight, scale: () for "tensor", (N, 1) for "row")."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        """y = x W^T + b with the quantized weight; output in x's dtype."""
        raise NotImplementedError

    def quantize_module(self, linear):
        """Optional: a whole replacement module for `linear` (e.g. a library's own quantized linear),
        which must not modify `linear`; None (the default) means `quantize_weight` + `linear`."""
        return None

    def declines(self, linear) -> str:
        """Why `quantize_module` gives no module for this `linear` although it does for others ("" when it
        does, or never does); such a layer runs through `quantize_weight` + `linear`, and `summary()`
        lists it with this reason."""
        return ""
