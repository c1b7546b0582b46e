"""Attention routing (`attention.py`, `routing.py`): each transformer's SDPA calls go to the backend's
kernel, when one outranks torch's SDPA, a kernel is named, or a context-parallel plan needs the calls."""

from __future__ import annotations

from ..attention import TORCH_SDPA, needs_router, select_kernel
from ..modelinfo import head_dim
from ..parallel.context import cp_mode
from ..routing import route, unroute
from .base import Applied, Context, Feature, first_dtype


class Attention(Feature):
    name = "attention"

    def check(self, ctx: Context) -> None:
        for t in ctx.transformers().values():
            dim = head_dim(t)
            if ctx.attention not in (None, "auto") or dim is not None:
                select_kernel(ctx.kernels, ctx.attention, first_dtype(t), dim or 64)

    def _targets(self, ctx: Context) -> list[str]:
        """Asked after quantization, as the dtype it sees is the model's as it will run."""
        context_parallel = ctx.parallel is not None and cp_mode(ctx.parallel) is not None
        return [n for n, t in ctx.transformers().items()
                if context_parallel or needs_router(ctx.kernels, ctx.attention, first_dtype(t), head_dim(t) or 64)]

    def wanted(self, ctx: Context) -> bool:
        return bool(self._targets(ctx))

    def apply(self, ctx: Context) -> Applied:
        record = Applied(self.name, report=lambda: self._report(ctx, record.parts))
        with record.building():
            for name in self._targets(ctx):
                record.parts[name] = router = ctx.router(name)
                modules = route(getattr(ctx.pipe, name), router)
                record.undo.append(lambda m=modules: unroute(m))
        return record

    def idle(self, ctx: Context) -> dict:
        return self._report(ctx, {})

    @staticmethod
    def _report(ctx: Context, routers: dict) -> dict:
        return {"attention": {"requested": ctx.attention or "auto",
                              "kernels": {n: sorted({k.name for k in routers[n].chosen.values()})
                                          if n in routers else [TORCH_SDPA.name] for n in ctx.adapters},
                              "eager_calls": {n: dict(r.calls) for n, r in routers.items()}}}
