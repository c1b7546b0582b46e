"""Adapter changes invalidate the cache, also inside a pipeline call or a `cachedit.request`.

Cache state lives for one pipeline call, so a call after `set_adapters` / `fuse_lora` / `unfuse_lora`
/ `unload_lora_weights` already starts fresh. Inside one call (a step callback changing adapter
weights) or one `cachedit.request` of direct transformer calls, stored residuals would still belong
to the old weights. Before each transformer call this hook reads the adapter signature (peft layers:
active adapters, their scales, which are merged, whether adapters are disabled, and the loaded
adapter names); where it differs from the previous call's, every stack starts fresh state, keeping
the current cache context, as at a new denoising run. With no adapter loaded (and none before) the
check is one attribute read.
"""

from __future__ import annotations

import torch.nn as nn
from diffusers.hooks import ModelHook

HOOK_NAME = "cachedit.cache.adapters"


def adapter_signature(module: nn.Module) -> tuple:
    """What decides the adapters' effect on the outputs (no tensor values: peft changes weights only
    through these)."""
    if not getattr(module, "_hf_peft_config_loaded", False):
        return ()
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = []
    for name, sub in module.named_modules():
        if isinstance(sub, BaseTunerLayer):
            scaling = getattr(sub, "scaling", {})
            layers.append((name, id(sub), tuple(sub.active_adapters), tuple(sorted(scaling.items())),
                           tuple(sub.merged_adapters), bool(sub.disable_adapters)))
    return tuple(sorted(getattr(module, "peft_config", {}))), tuple(layers)


class AdapterWatchHook(ModelHook):
    """On the transformer: fresh cache state where the adapter signature changed since the last call."""

    def __init__(self, caches: list) -> None:
        super().__init__()
        self.caches = caches
        self.signature: tuple | None = None
        self.invalidations = 0  # adapter changes seen while state was held (reported in summary)

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self.signature = adapter_signature(module)
        return module

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        if self.signature or getattr(module, "_hf_peft_config_loaded", False):
            signature = adapter_signature(module)
            if signature != self.signature:
                self.signature = signature
                if any(cache.states.live() for cache in self.caches):
                    self.invalidations += 1
                    for cache in self.caches:
                        cache.new_run()
        return args, kwargs
