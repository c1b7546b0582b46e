"""Swap a transformer's linears for quantized ones that run on the backend's path, reversibly.

The quantized weight (one byte per element) and its scale replace the float weight in the
module tree, so the transformer's own weight memory shrinks. The original `nn.Linear` modules
are kept, on the host, so that `disable()` restores the model bit for bit; pass
`QuantConfig(keep_original=False)` to free them (then `disable()` cannot restore and says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..config import QuantConfig
from .spec import QuantizedLinearPath


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W stored quantized and the matmul run by a backend's path."""

    def __init__(self, linear: nn.Linear, path: QuantizedLinearPath) -> None:
        super().__init__()
        qweight, scale = path.quantize_weight(linear.weight.detach())
        self.register_buffer("qweight", qweight)
        self.register_buffer("w_scale", scale)
        # Its own bias: the original (with its bias) goes to the host when kept for `disable()`.
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.path.linear(x, self.qweight, self.w_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, path={self.path.name}"


@dataclass
class Swapped:
    """Where each quantized linear went, to put the originals back."""

    places: list[tuple[nn.Module, str, nn.Module | None, torch.device]] = field(default_factory=list)
    fallbacks: dict[str, str] = field(default_factory=dict)  # linear name -> why the path's own module declined
    kept_in_float: int = 0  # linears of adapter (LoRA) layers, left as they are

    def check_restorable(self) -> None:
        if any(original is None for _, _, original, _ in self.places):
            raise RuntimeError("disable(): the original weights were freed (QuantConfig.keep_original=False), so "
                               "the quantized linears cannot be restored; reload the pipeline instead")


def adapter_linears(transformer: nn.Module) -> set[nn.Module]:
    """Linears inside adapter layers (peft's LoRA: a `base_layer` wrapped with `lora_A` / `lora_B`). They stay in
    float: peft reads and, on fuse / unfuse, rewrites its base layer's `weight`, which a quantized linear has not."""
    found = set()
    for module in transformer.modules():
        if isinstance(getattr(module, "base_layer", None), nn.Module) and hasattr(module, "lora_A"):
            found.update(m for m in module.modules() if type(m) is nn.Linear)
    return found


def quantizable(transformer: nn.Module, config: QuantConfig, skip=frozenset()) -> list[tuple[str, nn.Linear]]:
    """The linears to quantize: not excluded by name, not in `skip` (e.g. projections now run fused), not
    part of an adapter layer."""
    adapters = adapter_linears(transformer)
    return [(name, m) for name, m in transformer.named_modules()
            if type(m) is nn.Linear and not config.excludes(name) and m not in skip and m not in adapters]


def apply_quantization(transformer: nn.Module, config: QuantConfig, path: QuantizedLinearPath,
                       skip=frozenset()) -> Swapped:
    swapped = Swapped(kept_in_float=len(adapter_linears(transformer)))
    for name, linear in quantizable(transformer, config, skip):
        parent_name, _, attr = name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        device = linear.weight.device
        module = path.quantize_module(linear)
        if module is None and (reason := path.declines(linear)):
            swapped.fallbacks[name] = reason
        setattr(parent, attr, module or QuantizedLinear(linear, path))
        keep = linear.to("cpu") if config.keep_original else None
        swapped.places.append((parent, attr, keep, device))
    return swapped


def remove_quantization(swapped: Swapped) -> None:
    swapped.check_restorable()
    for parent, attr, original, device in swapped.places:
        setattr(parent, attr, original.to(device))


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding `t`'s data: tensor subclasses (torchao's quantized weights) report
    their logical dtype, so their inner tensors are what occupies memory."""
    if type(t) in (torch.Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [p for name in names for p in _plain_tensors(getattr(t, name))]


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the storage behind every parameter and buffer of the module tree (storage shared by
    several tensors, e.g. views of a fused weight, counted once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        for plain in _plain_tensors(t):
            storage = plain.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total
