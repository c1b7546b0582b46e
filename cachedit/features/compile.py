"""torch.compile of each transformer block. Before the cache: hooks registered first are innermost,
so cache decisions made by the outer hooks stay out of the compiled graphs."""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.hooks import ModelHook

from .. import hooks
from .base import Applied, Context, Feature
from .fuse_qkv import compile_options

COMPILE_HOOK = "cachedit.compile"


class CompileHook(ModelHook):
    """Runs a block's own forward compiled."""

    def __init__(self, options: dict) -> None:
        super().__init__()
        self.options = options

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self.compiled = torch.compile(module.forward, **self.options)
        return module

    def new_forward(self, module: nn.Module, *args, **kwargs):
        return self.compiled(*args, **kwargs)


def _identity(x):
    return x


def _options(ctx: Context, name: str) -> dict:
    options = compile_options(ctx, name)
    options.pop("fuse_qkv", None)  # the fuse_qkv feature's option, not torch.compile's
    return options


class Compile(Feature):
    name = "compile"

    def check(self, ctx: Context) -> None:
        """torch.compile itself checks the merged options on a stand-in function (it checks the backend,
        mode and inductor options when called, compiling nothing), so a bad one fails before any change."""
        if ctx.compile is None:
            return
        for name in ctx.adapters:
            options = _options(ctx, name)
            try:
                torch.compile(_identity, **options)
            except Exception as exc:
                field = ("backend" if type(exc).__name__ == "InvalidBackend" else
                         "mode" if str(exc).startswith("Unrecognized mode") else "options")
                raise ValueError(f"CompileConfig.{field}: torch.compile refuses {options} (the user's config merged "
                                 f"with backend {ctx.backend.name!r}'s defaults): {str(exc)[:300]}") from None

    def wanted(self, ctx: Context) -> bool:
        return ctx.compile is not None

    def apply(self, ctx: Context) -> Applied:
        record = Applied(self.name)
        blocks, options = [], {}
        with record.building():
            for name, transformer in ctx.transformers().items():
                options = _options(ctx, name)
                for block in ctx.adapters[name].blocks(transformer):
                    hooks.attach(block, CompileHook(options), COMPILE_HOOK)
                    blocks.append(block)
                    record.undo.append(lambda b=block: hooks.detach(b, COMPILE_HOOK))
        record.parts = {"blocks": blocks, "options": options}
        record.report = lambda: {"compile": {"blocks": len(blocks), **options}}
        return record

    def idle(self, ctx: Context) -> dict:
        return {"compile": None}
