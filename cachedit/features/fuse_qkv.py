"""Fused QKV projections (`fusion.py`), where the compile options ask for them. First: quantization
then quantizes the fused linears."""

from __future__ import annotations

from ..config import CompileTarget
from ..fusion import fuse_qkv, unfuse_qkv
from .base import Applied, Context, Feature


def compile_options(ctx: Context, name: str) -> dict:
    """The backend's compile options for transformer `name`'s blocks, the user's config merged in."""
    return ctx.plugins.compile_options(ctx.backend, CompileTarget("transformer_block", ctx.adapters[name].family,
                                                                  ctx.compile))


class FuseQKV(Feature):
    name = "fuse_qkv"

    def _targets(self, ctx: Context) -> list[str]:
        if ctx.compile is None or (ctx.parallel is not None and ctx.parallel.tensor > 1):
            return []
        return [n for n, a in ctx.adapters.items() if a.fuses_qkv and compile_options(ctx, n).get("fuse_qkv", False)]

    def wanted(self, ctx: Context) -> bool:
        return bool(self._targets(ctx))

    def apply(self, ctx: Context) -> Applied:
        record = Applied(self.name, report=lambda: self._report(record.parts))
        with record.building():
            for name in self._targets(ctx):
                fused = record.parts[name] = fuse_qkv(getattr(ctx.pipe, name))
                record.undo.append(lambda fused=fused: unfuse_qkv(fused))
        return record

    def idle(self, ctx: Context) -> dict:
        return {} if ctx.compile is None else self._report({})

    @staticmethod
    def _report(parts: dict) -> dict:
        return {"compile": {"fused_qkv_modules": {n: len(f.modules) for n, f in parts.items()}}}
