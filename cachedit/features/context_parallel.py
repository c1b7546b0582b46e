"""Context parallelism (`parallel/context.py`): Ulysses, Ring or USP over each transformer's sequence.
After the cache: its splits are outermost, and its reduce is a stage of the cache's reducer chain."""

from __future__ import annotations

from ..parallel.context import apply_context_parallel, check_context_parallel, cp_mode, remove_context_parallel
from .base import Applied, Context, Feature


class ContextParallel(Feature):
    name = "context_parallel"

    def check(self, ctx: Context) -> None:
        if ctx.parallel is not None and cp_mode(ctx.parallel) is not None:
            check_context_parallel(ctx.transformers(), ctx.parallel, ctx.kernels, ctx.attention)

    def wanted(self, ctx: Context) -> bool:
        return ctx.parallel is not None and cp_mode(ctx.parallel) is not None

    def apply(self, ctx: Context) -> Applied:
        record = Applied(self.name)
        with record.building():
            for name, transformer in ctx.transformers().items():
                cp = record.parts[name] = apply_context_parallel(
                    transformer, ctx.parallel, ctx.communicator, ctx.router(name), mesh=ctx.mesh,
                    device_type=ctx.backend.device_type)
                record.undo.append(lambda cp=cp: remove_context_parallel(cp))
                ctx.reducer(name).add(cp.reduce)
                record.undo.append(lambda r=ctx.reducer(name), cp=cp: r.remove(cp.reduce))
        return record
