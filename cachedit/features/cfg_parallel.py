"""CFG parallelism (`parallel/cfg.py`): each half of the ranks runs one branch. After the context-parallel
plan: outermost on the transformer, and its reducer stage runs after that plan's."""

from __future__ import annotations

from ..parallel.cfg import apply_cfg_parallel, remove_cfg_parallel
from ..parallel.mesh import check_world
from .base import Applied, Context, Feature


class CfgParallel(Feature):
    name = "cfg_parallel"

    def check(self, ctx: Context) -> None:
        if ctx.parallel is not None and ctx.parallel.cfg > 1:
            cache = ctx.cache
            if cache is not None and cache.branch_thresholds:  # the CFG ranks decide together, on one threshold
                raise ValueError(f"CacheConfig.branch_thresholds={cache.branch_thresholds} with ParallelConfig.cfg="
                                 f"{ctx.parallel.cfg} is not supported; allowed: branch_thresholds={{}} when cfg > 1")
            check_world(ctx.parallel)

    def wanted(self, ctx: Context) -> bool:
        return ctx.parallel is not None and ctx.parallel.cfg == 2

    def apply(self, ctx: Context) -> Applied:
        record = Applied(self.name)
        with record.building():
            for name, transformer in ctx.transformers().items():
                cached = ctx.part("cache", name)
                stacks = cached.stacks if cached is not None else []

                def drop(branch, stacks=stacks):  # the other half runs that branch: its cache state goes
                    for cache in stacks:
                        cache.drop_context(branch)

                hook = record.parts[name] = apply_cfg_parallel(transformer, ctx.communicator(ctx.group("cfg")), drop)
                record.undo.append(lambda t=transformer: remove_cfg_parallel(t))
                ctx.reducer(name).add(hook.reduce)
                record.undo.append(lambda r=ctx.reducer(name), h=hook: r.remove(h.reduce))
        return record
