"""Attention routing on a model: a hook on each attention module runs its forward inside an
`AttentionRouter` (`attention.py`), so only attention pays the per-op cost of the mode."""

from __future__ import annotations

import torch.nn as nn
from diffusers.hooks import ModelHook

from . import hooks
from ._diffusers_compat import original_forward
from .attention import AttentionRouter

ATTENTION_HOOK = "cachedit.attention"


class AttentionHook(ModelHook):
    """Runs the module's forward inside its `AttentionRouter`."""

    def __init__(self, router: AttentionRouter) -> None:
        super().__init__()
        self.router = router

    def new_forward(self, module: nn.Module, *args, **kwargs):
        with self.router:
            return original_forward(self)(*args, **kwargs)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Where the router is active: each attention module (diffusers attention modules carry a
    `processor`), or the whole model when it has none."""
    found = [m for m in model.modules() if hasattr(m, "processor") and m is not model]
    return found or [model]


def route(model: nn.Module, router: AttentionRouter) -> list[nn.Module]:
    """Hook every attention module of `model` to `router`; returns the hooked modules."""
    modules = attention_modules(model)
    for module in modules:
        hooks.attach(module, AttentionHook(router), ATTENTION_HOOK)
    return modules


def unroute(modules) -> None:
    for module in reversed(list(modules)):
        hooks.detach(module, ATTENTION_HOOK)
