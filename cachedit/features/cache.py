"""DBCache / DBPrune (`cache/dbcache.py`) on every block stack. After compile (outside its graphs), before
the parallel plans (their splits are outermost; their reducer stages agree the cache's decisions)."""

from __future__ import annotations

from typing import Any

from ..cache.dbcache import apply_cache, remove_cache
from .base import Applied, Context, Feature


def _cache_report(caches) -> dict[str, Any]:
    stacks = []
    for cache in caches:
        contexts = cache.states.reports() or cache.last_call
        done = sum(c["blocks_computed"] for c in contexts.values())
        total = sum(c["blocks_total"] for c in contexts.values())
        stacks.append({"blocks": len(cache.blocks), "contexts": contexts,
                       "computed_fraction": done / total if total else None})
    done = sum(c["blocks_computed"] for s in stacks for c in s["contexts"].values())
    total = sum(c["blocks_total"] for s in stacks for c in s["contexts"].values())
    return {"stacks": stacks, "computed_fraction": done / total if total else None,
            "ideal_speedup": total / done if done else None}


class Cache(Feature):
    name = "cache"

    def check(self, ctx: Context) -> None:
        if ctx.cache is not None:
            for name, t in ctx.transformers().items():
                ctx.cache.check_stacks([len(stack) for stack in ctx.adapters[name].stacks(t)], f"pipe.{name}")

    def wanted(self, ctx: Context) -> bool:
        return ctx.cache is not None

    def apply(self, ctx: Context) -> Applied:
        record = Applied(self.name, report=lambda: {
            "cache": {"config": vars(ctx.cache), **{n: _cache_report(c.stacks) for n, c in record.parts.items()}}})
        with record.building():
            for name, transformer in ctx.transformers().items():
                cached = record.parts[name] = apply_cache(transformer, ctx.adapters[name], ctx.cache, ctx.num_steps,
                                                          ctx.scope, reduce=ctx.reducer(name))
                record.undo.append(lambda t=transformer, c=cached: remove_cache(t, c))
        return record

    def idle(self, ctx: Context) -> dict:
        return {"cache": None}
