"""Context-parallel plans: which module inputs are split on which dim, where outputs are gathered.

A plan uses diffusers' own vocabulary (`ContextParallelInput` / `ContextParallelOutput`, see
`diffusers.models._modeling_parallel`) as a list of `(module path, spec)` entries, so a model
class's `_cp_plan` is read as is; a path may use `*` for every child of a ModuleList or ModuleDict.
A spec is either a dict {argument name or output index: ContextParallelInput, or a tuple of them
for a tuple argument}, split on the way in (or, with `split_output`, on the way out), or a
ContextParallelOutput (or a list, one per output) gathered on the way out.

What `_cp_plan` does not say is which attention modules see keys and values that are *not*
sequence-sharded (Wan's cross-attention reads the whole prompt on every rank): those run locally,
with no exchange. That, and plans for models diffusers has none for, is declared here per class,
so a family is supported only where someone checked it: `CP_PLANS.register(class_name, build)`
(a plugin: in `cachedit_register_models`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn
from .._diffusers_compat import ContextParallelInput, ContextParallelOutput, cp_plan

from .. import model_lookup
from ..registry import Registry, functions_returning

__all__ = ["CPPlan", "CP_PLANS", "ContextParallelInput", "ContextParallelOutput", "cp_plan_for", "supported_classes"]


@dataclass(frozen=True)
class CPPlan:
    entries: tuple[tuple[str, Any], ...]
    local_attention: tuple[str, ...] = ()  # attention modules (paths, `*` allowed) whose K/V are replicated
    source: str = "cachedit"


CPPlanBuilder = Callable[[nn.Module], CPPlan]

# Module class name -> how modules of that class are split for context parallelism.
CP_PLANS: Registry[CPPlanBuilder] = Registry(
    "context-parallel plan", check=functions_returning("context-parallel plan"), before_lookup=model_lookup.before_lookup)


def supported_classes() -> list[str]:
    return sorted(CP_PLANS.names())


def cp_plan_for(transformer: nn.Module) -> CPPlan | None:
    name = type(transformer).__name__
    return CP_PLANS.get(name)(transformer) if name in CP_PLANS else None


def diffusers_plan(local_attention: tuple[str, ...] = ()) -> Callable[[nn.Module], CPPlan]:
    """The class's own diffusers `_cp_plan`, plus the attention modules that stay local."""

    def build(transformer: nn.Module) -> CPPlan:
        return CPPlan(tuple(cp_plan(type(transformer)).items()), local_attention, source="diffusers")

    return build


def _zimage(transformer: nn.Module) -> CPPlan:
    """Z-Image (diffusers has no `_cp_plan`): each refiner stage and the main layers split their
    sequence, key mask and rotary table at their first layer; the refiners gather after their
    last layer (the model then joins image and caption by their full lengths), the main stream
    after the final layer."""
    entries: list[tuple[str, Any]] = []
    for stage in ("noise_refiner", "context_refiner", "siglip_refiner", "layers"):
        layers = getattr(transformer, stage, None)
        if not layers:
            continue
        entries.append((f"{stage}.0", {"x": ContextParallelInput(split_dim=1, expected_dims=3)}))
        entries.append((f"{stage}.*", {"attn_mask": ContextParallelInput(split_dim=1, expected_dims=2),
                                       "freqs_cis": ContextParallelInput(split_dim=1, expected_dims=3)}))
        if stage != "layers":
            entries.append((f"{stage}.{len(layers) - 1}", ContextParallelOutput(gather_dim=1, expected_dims=3)))
    entries.append(("all_final_layer.*", ContextParallelOutput(gather_dim=1, expected_dims=3)))
    return CPPlan(tuple(entries))


for _name, _build in {
    # Joint attention over text and image tokens, both split: nothing stays local.
    "FluxTransformer2DModel": diffusers_plan(),
    "Flux2Transformer2DModel": diffusers_plan(),
    "QwenImageTransformer2DModel": diffusers_plan(),
    # The prompt is split too, so cross-attention K/V are sharded like self-attention's.
    "LTXVideoTransformer3DModel": diffusers_plan(),
    # The prompt is not split (image prompts make it indivisible): cross-attention stays local.
    "WanTransformer3DModel": diffusers_plan(local_attention=("blocks.*.attn2",)),
    "ZImageTransformer2DModel": _zimage,
}.items():
    CP_PLANS.register(_name, _build)


def resolve(root: nn.Module, path: str) -> list[nn.Module]:
    """The modules a plan path names ("" is the root; "*" is every child)."""
    found = [root]
    for atom in path.split(".") if path else []:
        nxt = []
        for module in found:
            if atom == "*":
                nxt.extend(module.children())
            elif hasattr(module, atom) and isinstance(getattr(module, atom), nn.Module):
                nxt.append(getattr(module, atom))
            elif isinstance(module, nn.ModuleDict) and atom in module:
                nxt.append(module[atom])
            else:
                raise ValueError(f"context-parallel plan path {path!r}: {type(module).__name__} has no child {atom!r}")
        found = nxt
    return found
