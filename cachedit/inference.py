"""Accelerated pipeline calls run under `torch.inference_mode`, not only the pipeline's own `torch.no_grad`.

The kernels and their inputs are the same, so the outputs are bitwise the same; what goes is autograd's
per-op bookkeeping that `no_grad` still pays (version counters, view tracking). On a small DiT, where op
dispatch is a large share of a step, that is 5-8 % of the call (`bench/bench_cache.py --parts overhead`).

Three things would otherwise break, and are handled here:
- tensors made inside inference mode are "inference tensors" (no in-place update or autograd outside it):
  the tensors a call returns are handed back as normal tensors (`as_normal`, one copy of the output);
- parameters moved during a call (diffusers' model / sequential / group offloading, accelerate's device
  maps) would become inference tensors, so a later `fuse_lora` or optimizer step on them fails: such a
  call keeps plain `no_grad`;
- tensor-subclass weights (torchao's quantized tensors, DTensor, wrapper subclasses in general) cannot be
  viewed under inference mode ("Cannot set version_counter for inference tensor"): a pipeline holding
  any keeps plain `no_grad` too (`needs_no_grad`).

`accelerate(..., inference_mode=False)` turns it off, e.g. for callbacks that enable grad inside a call.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

from ._diffusers_compat import GROUP_OFFLOADING_HOOKS, hook_registry


def _components(pipe) -> list[nn.Module]:
    """The pipeline's registered modules, read off its config: `pipe.components` would compute the
    pipeline's `__init__` signature at every call."""
    config = getattr(pipe, "config", None) or {}  # a component's entry is its (library, class name)
    found = (getattr(pipe, name, None) for name, entry in config.items()
             if isinstance(entry, (tuple, list)) and not name.startswith("_"))
    return [m for m in found if isinstance(m, nn.Module)]


def _moves_parameters(module: nn.Module) -> bool:
    if hasattr(module, "_hf_hook"):  # accelerate: cpu_offload_with_hook / cpu_offload / dispatch_model
        return True
    registry = hook_registry(module)
    return registry is not None and any(name in registry.hooks for name in GROUP_OFFLOADING_HOOKS)


def _is_subclass(t: torch.Tensor) -> bool:
    return type(t.data if isinstance(t, nn.Parameter) else t) is not torch.Tensor


def needs_no_grad(pipe) -> bool:
    """Whether a call of `pipe` must keep plain `no_grad`: a module of a component has a hook that moves
    parameters between devices during the call, or holds a tensor-subclass parameter or buffer (one walk)."""
    return any(_moves_parameters(m) or any(map(_is_subclass, (*m.parameters(recurse=False), *m.buffers(recurse=False))))
               for c in _components(pipe) for m in c.modules())


@contextmanager
def mode(pipe, enabled: bool):
    """Inference mode around one call of `pipe` where it is enabled and safe; yields whether it is on."""
    on = enabled and not torch.is_inference_mode_enabled() and not needs_no_grad(pipe)
    with torch.inference_mode() if on else nullcontext():
        yield on


def as_normal(output):
    """`output` with every inference tensor in it (a tensor, a list / tuple, a dict or diffusers' BaseOutput)
    copied into a normal tensor; everything else as it is. Run outside inference mode."""
    if isinstance(output, torch.Tensor):
        return output.clone() if output.is_inference() else output
    if isinstance(output, OrderedDict) and hasattr(output, "__dataclass_fields__"):  # diffusers' BaseOutput
        for key, value in list(output.items()):
            output[key] = as_normal(value)
        return output
    if isinstance(output, dict):
        return type(output)((k, as_normal(v)) for k, v in output.items())
    if isinstance(output, list):
        return [as_normal(v) for v in output]
    if isinstance(output, tuple) and not hasattr(output, "_fields"):
        return tuple(as_normal(v) for v in output)
    return output
