"""Tensor parallelism through peft LoRA layers: each shard holds its slice of A and B.

A planned linear wrapped by peft (`lora.Linear`: `base_layer`, `lora_A[name]`, `lora_B[name]`) computes
`base(x) + B(A(x)) * scale`. Column-split (output features): the base keeps its rows, B keeps the same
rows (its output features), A stays whole, so this rank's output is its slice of the full output.
Row-split (input features): the base keeps its columns, A keeps the same columns (its input
features), B stays whole, so each rank's B(A(x_r)) is a partial sum that the plan's reduce adds up,
like the base's. Packed splits cut A or B by the same blocks as the base. peft's fuse / unfuse
(`B @ A * scale` added to the base weight) then act on the shards as on the whole, and `set_adapters`
only changes `scale`: both keep working after `accelerate`.

Refused before anything is sharded (ValueError): DoRA (its magnitude normalises the whole weight's
rows), LoRA on embeddings or on a gathered (AdaLN) linear, LoRA biases on a row-split linear, and peft
tuners other than LoRA. `unload_lora_weights` after `accelerate` puts each sharded base layer back
in its wrapper's place; `PlacementHook` moves the wrapper's hooks onto it. A LoRA loaded after
`accelerate` goes through `tp_load.py`, which loads it into the whole model and shards it here.
"""

from __future__ import annotations

import torch.nn as nn
from diffusers.hooks import ModelHook

from .._diffusers_compat import hook_registry
from .tp_plans import PackedColwiseParallel, PackedRowwiseParallel

ROW_STYLES = ("rowwise",)
COL_STYLES = ("colwise",)


def is_peft_layer(module: nn.Module) -> bool:
    return isinstance(getattr(module, "base_layer", None), nn.Module)


def _is_row(style) -> bool:
    return style in ROW_STYLES or isinstance(style, PackedRowwiseParallel)


def _is_col(style) -> bool:
    return style in COL_STYLES or isinstance(style, PackedColwiseParallel)


def check_lora(module: nn.Module, style, name: str, setting: str) -> None:
    """Raise ValueError where a peft layer at a planned linear cannot be sharded."""
    if not isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
        if _is_row(style) or _is_col(style):
            raise ValueError(f"{setting}: {name} carries a peft {type(module).__name__}, not a LoRA layer; "
                             "allowed: peft LoRA adapters")
    refuse_lora(style, module.base_layer, bool(getattr(module, "lora_embedding_A", None)),
                bool(len(getattr(module, "lora_magnitude_vector", None) or {})),
                any(b.bias is not None for b in getattr(module, "lora_B", {}).values()), name, setting)


def refuse_lora(style, base: nn.Module, embedding: bool, dora: bool, bias: bool, name: str, setting: str) -> None:
    """Raise ValueError where a LoRA on the planned module `name` (`base`, split by `style`) cannot be
    sharded: `embedding` (a LoRA embedding), `dora` (a DoRA magnitude), `bias` (B has a bias)."""
    if not (_is_row(style) or _is_col(style)):
        raise ValueError(f"{setting}: {name} carries a peft adapter, but its tensor-parallel style {style!r} is "
                         "not column- or row-split; allowed: LoRA on colwise / rowwise linears (unload or fuse "
                         "the adapter there first)")
    if embedding or not isinstance(base, nn.Linear):
        raise ValueError(f"{setting}: {name} is a LoRA layer around a {type(base).__name__}; allowed: "
                         "LoRA on nn.Linear")
    if dora:
        raise ValueError(f"{setting}: {name} has a DoRA adapter (its magnitude normalises whole weight rows); "
                         "allowed: plain LoRA (use_dora=False)")
    if _is_row(style) and bias:
        raise ValueError(f"{setting}: {name} is row-split and its LoRA B has a bias (lora_bias=True), which "
                         "every rank would add; allowed: lora_bias=False")


def lora_parts(module: nn.Module, style, base_splits: dict) -> list[tuple[nn.Module, dict]]:
    """(submodule, {param: ParamSplit or None}) for the base layer and every adapter's A and B."""
    parts = [(module.base_layer, base_splits)]
    weight = base_splits["weight"]
    for adapter in module.lora_A:
        a, b = module.lora_A[adapter], module.lora_B[adapter]
        if _is_col(style):  # output features: B's rows, like the base's
            parts.append((b, {"weight": weight, "bias": weight}))
        else:  # input features: A's columns, like the base's
            parts.append((a, {"weight": weight}))
    return parts


def move_hooks(tp, old: nn.Module, new: nn.Module) -> None:
    """Every hook of `tp` on `old` moves onto `new` (a peft layer and its base layer trading places)."""
    from .. import hooks

    for j, (m, name) in enumerate(tp.attached):
        if m is old:
            hook = hook_registry(old).hooks[name]
            hooks.detach(old, name)
            hooks.attach(new, hook, name)
            tp.attached[j] = (new, name)


class PlacementHook(ModelHook):
    """On the sharded module, before each call: a hooked peft layer that peft replaced by its own base
    layer (`unload_lora_weights` after `accelerate`) hands its tensor-parallel hooks (the reduce of a
    row-split sum, the gather of a column split) to that base layer, which now computes alone."""

    def __init__(self, tp) -> None:
        super().__init__()
        self.tp = tp
        self.slots = []  # (parent, attribute, hooked module)

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self.refresh()
        return module

    def refresh(self) -> None:
        """Find the hooked peft layers again (a LoRA was loaded after accelerate)."""
        names = {id(m): n for n, m in self.tp.module.named_modules()}
        self.slots = []
        for module, _ in self.tp.attached:
            path = names.get(id(module), "")
            if path and is_peft_layer(module):
                parent_path, _, attr = path.rpartition(".")
                self.slots.append((self.tp.module.get_submodule(parent_path), attr, module))

    def pre_forward(self, module, *args, **kwargs):
        for i, (parent, attr, hooked) in enumerate(self.slots):
            current = getattr(parent, attr)
            if current is not hooked and current is hooked.base_layer:
                move_hooks(self.tp, hooked, current)
                self.slots[i] = (parent, attr, current)
        return args, kwargs
