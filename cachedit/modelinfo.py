"""Reading a model's config: the one helper for the numbers plans and checks need (heads, head dim).

diffusers models carry a FrozenDict `config`, transformers models an object with attributes; both
are read the same way here."""

from __future__ import annotations

import torch.nn as nn


def config_value(module: nn.Module, *keys: str):
    """The first of `keys` set (not None) in `module.config`, else None."""
    cfg = getattr(module, "config", {})
    for key in keys:
        value = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
        if value is not None:
            return value
    return None


def head_dim(module: nn.Module) -> int | None:
    """The attention head dim, when the config names one (a one-element list counts; several: None)."""
    for key in ("attention_head_dim", "head_dim"):
        value = config_value(module, key)
        if isinstance(value, int):
            return value
        if isinstance(value, (tuple, list)) and value:
            return int(value[0]) if len(value) == 1 else None
    return None


def num_heads(module: nn.Module) -> int | None:
    """The number of attention heads, when the config names it."""
    for key in ("num_attention_heads", "n_heads", "num_heads"):
        value = config_value(module, key)
        if isinstance(value, int):
            return value
    return None
