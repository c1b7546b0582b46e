"""The preconditions every feature assumes, checked before any feature's own check."""

from __future__ import annotations

import torch
import torch.nn as nn

from .._diffusers_compat import cache_config, hook_registry
from ..adapters import adapter_for, transformers_of


def _execution_device(module: nn.Module) -> str | None:
    """Where an offloaded model computes: accelerate's offload hooks keep the weights elsewhere (on "meta"
    for sequential offload) and bring them to their `execution_device` for each call."""
    for m in module.modules():
        device = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device).type
    return None


def _diffusers_cache(transformer: nn.Module) -> str | None:
    """The diffusers cache already on `transformer` (`enable_cache`, or a cache hook applied directly), or None."""
    config = cache_config(transformer)
    if config is not None:
        return type(config).__name__
    for module in transformer.modules():
        for hook in getattr(hook_registry(module), "hooks", {}).values():
            where = type(hook).__module__
            if where.startswith("diffusers.hooks.") and ("cache" in where or "broadcast" in where):
                return type(hook).__name__
    return None


def check_pipeline(pipe, backend) -> dict:
    """What every feature assumes (ValueError otherwise): transformers, on the backend's device, without a
    diffusers cache of their own. Returns their adapters by component name."""
    transformers = transformers_of(pipe)
    if not transformers:
        raise ValueError(f"pipe ({type(pipe).__name__}) has no `transformer` component to accelerate")
    adapters = {name: adapter_for(t) for name, t in transformers.items()}
    for name, t in transformers.items():
        param = next(t.parameters(), None)
        here = backend.device_type
        if param is not None and param.device.type != here and _execution_device(t) != here:
            raise ValueError(f"device={backend.name!r} runs on {backend.device_type!r} but pipe.{name} is on "
                             f"{param.device.type!r}; move it first, e.g. pipe.to({backend.device_type!r})")
        already = _diffusers_cache(t)
        if already is not None:
            raise ValueError(f"pipe.{name} already runs diffusers' own cache ({already}); cachedit would stack "
                             f"its hooks on top of it; call pipe.{name}.disable_cache() first")
    return adapters
