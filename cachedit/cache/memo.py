"""Per-call memoization of modules that are pure functions of their inputs (rotary embeddings).

A DiT recomputes its rotary position embedding at every denoising step from the same position
ids; once blocks are skipped that fixed cost is a growing share of the step. Adapters name such
modules (`Adapter.pure_modules`); while a cache is applied each of them returns its previous
output when called again with equal arguments, within one pipeline call or request (its state is
cleared with the cache state: at every call's start and exit, see `lifecycle.py`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.hooks import ModelHook

from .._diffusers_compat import mark_stateful, original_forward

HOOK_NAME = "cachedit.memo"


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


class MemoHook(ModelHook):
    def __init__(self) -> None:
        super().__init__()
        mark_stateful(self)
        self.last: tuple | None = None  # (args, kwargs, output)
        self.hits = 0

    def new_forward(self, module: nn.Module, *args, **kwargs):
        if self.last is not None and _same(args, self.last[0]) and _same(kwargs, self.last[1]):
            self.hits += 1
            return self.last[2]
        output = original_forward(self)(*args, **kwargs)
        self.last = (args, kwargs, output)
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.last = None
        return module


def apply_memo(transformer: nn.Module, names: tuple[str, ...]) -> list[tuple[nn.Module, MemoHook]]:
    from .. import hooks

    applied = []
    for name in names:
        module = getattr(transformer, name, None)
        if isinstance(module, nn.Module):
            hook = MemoHook()
            hooks.attach(module, hook, HOOK_NAME)
            applied.append((module, hook))
    return applied


def remove_memo(applied) -> None:
    from .. import hooks

    for module, _ in applied:
        hooks.detach(module, HOOK_NAME)
