"""Each attention processor's call signature, looked up once per `accelerate` instead of at every call.

diffusers' attention modules (`Attention`, `FluxAttention` and most model-specific ones) filter their
keyword arguments by `inspect.signature(self.processor.__call__)` at every forward: tens of
microseconds of Python per attention call, 3-5 % of a small model's step on a CPU and part of the
launch-bound time of a batch-1 step on an accelerator. `sign` gives each processor instance a
`__call__` attribute that carries the signature (`inspect.signature` reads `__signature__` first), so
that lookup becomes an attribute read. Calling the processor is untouched: `module.processor(...)`
still runs its class's `__call__`, with the same arguments, so the outputs are the same by
construction. `unsign` deletes exactly the attributes `sign` set; a processor installed later (a
LoRA or IP-Adapter load, `set_attn_processor`) is simply not signed and pays the lookup again.
"""

from __future__ import annotations

import inspect

import torch.nn as nn


class SignedCall:
    """A processor's `__call__` as diffusers' forwards look it up: its signature, computed once."""

    def __init__(self, processor) -> None:
        self.processor = processor
        self.__signature__ = inspect.signature(processor.__call__)

    def __call__(self, *args, **kwargs):
        return type(self.processor).__call__(self.processor, *args, **kwargs)


def looks_up_signatures(module: nn.Module) -> bool:
    """Whether the module's forward calls `signature` (its bytecode names it): diffusers' filtering ones."""
    forward = getattr(type(module), "forward", None)
    return "signature" in getattr(getattr(forward, "__code__", None), "co_names", ())


def sign(model: nn.Module) -> list:
    """Sign each attention processor of `model` whose module looks its signature up per call, unless it
    has an instance `__call__` of its own; returns the processors signed (each once, also when modules
    share one)."""
    signed = []
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is None or module is model or any(p is processor for p in signed) \
                or not looks_up_signatures(module):
            continue
        attributes = getattr(processor, "__dict__", None)
        if attributes is None or "__call__" in attributes:  # slotted, or somebody's own instance __call__
            continue
        attributes["__call__"] = SignedCall(processor)
        signed.append(processor)
    return signed


def unsign(signed: list) -> None:
    for processor in signed:
        if isinstance(vars(processor).get("__call__"), SignedCall):
            del vars(processor)["__call__"]
