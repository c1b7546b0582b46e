"""Attach and detach diffusers `ModelHook`s so that detaching leaves the module exactly as found."""

from __future__ import annotations

import torch.nn as nn
from diffusers.hooks import HookRegistry, ModelHook

from ._diffusers_compat import drop_hook_registry, hook_registry


def attach(module: nn.Module, hook: ModelHook, name: str) -> None:
    created = hook_registry(module) is None
    had_forward = "forward" in module.__dict__
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    hook._cachedit_restore = (created, had_forward)


def detach(module: nn.Module, name: str) -> None:
    registry = hook_registry(module)
    if registry is None or name not in registry.hooks:
        return
    created, had_forward = registry.hooks[name]._cachedit_restore
    registry.remove_hook(name, recurse=False)
    if not registry.hooks:
        if not had_forward:
            module.__dict__.pop("forward", None)  # back to the class's forward
        if created:
            drop_hook_registry(module)
