"""The ControlNet sharded like the transformer (`parallel/controlnet.py`). After the transformers'
context-parallel plans, whose split state its residual hooks use: outermost."""

from __future__ import annotations

from ..parallel.context import cp_mode
from ..parallel.controlnet import apply_controlnet_parallel, check_controlnet_parallel, remove_controlnet_parallel
from .base import Applied, Context, Feature


class ControlNetParallel(Feature):
    name = "controlnet_parallel"

    def check(self, ctx: Context) -> None:
        if ctx.parallel is not None:
            check_controlnet_parallel(ctx.pipe, ctx.parallel, ctx.kernels, ctx.attention)

    def wanted(self, ctx: Context) -> bool:
        p = ctx.parallel
        return (p is not None and (cp_mode(p) is not None or p.controlnet)
                and getattr(ctx.pipe, "controlnet", None) is not None)

    def apply(self, ctx: Context) -> Applied:
        cp = ctx.record("context_parallel")
        applied = apply_controlnet_parallel(ctx.pipe, ctx.parallel, ctx.kernels, ctx.attention,
                                            dict(cp.parts) if cp is not None else {}, ctx.communicator,
                                            mesh=ctx.mesh, device_type=ctx.backend.device_type)
        return Applied(self.name, parts={"controlnet": applied},
                       report=lambda: {"controlnet_parallel": applied.stats()},
                       undo=[lambda: remove_controlnet_parallel(applied)])

    def idle(self, ctx: Context) -> dict:
        return {"controlnet_parallel": None}
