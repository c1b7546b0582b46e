"""Fused QKV projections: one GEMM for q, k and v instead of three, where the model supports it.

diffusers' attention modules build the fused linears (`fuse_projections`: `to_qkv`, `to_kv`,
`to_added_qkv`, `to_added_kv`) and their processors use them while `fused_projections` is set.
diffusers keeps the separate projections too, which would cost a second copy of every q/k/v
weight; here each separate weight is re-pointed at its slice of the fused weight, so fusing costs
no memory, and `unfuse` gives each back its own storage with the same values (bitwise).

Fusion is applied only for families whose processors honour the flag (`Adapter.fuses_qkv`) and
only for attention modules that allow it (`_supports_qkv_fusion`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

# fused linear -> the separate linears it concatenates, in order
FUSED_PARTS = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
    "to_added_kv": ("add_k_proj", "add_v_proj"),
}


@dataclass
class FusedQKV:
    """The attention modules fused on one transformer, and the separate linears now aliasing them."""

    modules: list[nn.Module] = field(default_factory=list)
    aliased: list[nn.Linear] = field(default_factory=list)


def fusable(transformer: nn.Module) -> list[nn.Module]:
    return [m for m in transformer.modules()
            if callable(getattr(m, "fuse_projections", None)) and getattr(m, "_supports_qkv_fusion", False)
            and not getattr(m, "fused_projections", False) and isinstance(getattr(m, "to_q", None), nn.Linear)]


@torch.no_grad()
def fuse_qkv(transformer: nn.Module) -> FusedQKV:
    record = FusedQKV()
    for module in fusable(transformer):
        module.fuse_projections()
        record.modules.append(module)
        for fused_name, part_names in FUSED_PARTS.items():
            fused = getattr(module, fused_name, None)
            if not isinstance(fused, nn.Linear):
                continue
            parts = [getattr(module, n) for n in part_names]
            for attr in ("weight", "bias"):
                if getattr(fused, attr) is None:
                    continue
                slices = getattr(fused, attr).split([getattr(p, attr).shape[0] for p in parts])
                for part, piece in zip(parts, slices):
                    getattr(part, attr).data = piece  # same Parameter object, now a view of the fused one
            record.aliased.extend(parts)
    return record


@torch.no_grad()
def unfuse_qkv(record: FusedQKV) -> None:
    for linear in record.aliased:
        for param in (linear.weight, linear.bias):
            if param is not None and param.data._base is not None:
                param.data = param.data.clone()
    for module in record.modules:
        module.unfuse_projections()
    record.modules.clear()
    record.aliased.clear()
