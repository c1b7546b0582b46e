"""Per-call state (`lifecycle.py`): every pipeline call starts fresh and releases it however it ends; the
call runs under `torch.inference_mode` unless turned off (`inference.py`). Last: it wraps the pipeline call
around everything the other features hooked."""

from __future__ import annotations

from .. import lifecycle
from .base import Applied, Context, Feature


class CallScope(Feature):
    name = "call_scope"

    def wanted(self, ctx: Context) -> bool:
        return ctx.inference_mode or ctx.record("cache") is not None or ctx.record("cfg_parallel") is not None

    def apply(self, ctx: Context) -> Applied:
        def on_call():  # a pipeline call knows its own step count: a refresh/request override does not outlive it
            ctx.num_steps_override = None

        own = lifecycle.install(ctx.pipe, ctx.scope, on_call, inference_mode=ctx.inference_mode)
        return Applied(self.name, parts={"pipe": own}, undo=[lambda: lifecycle.remove(ctx.pipe, own)],
                       prechecks=[lambda: lifecycle.check_removable(ctx.pipe, own)],
                       report=lambda: {"inference_mode": ctx.inference_mode})

    def idle(self, ctx: Context) -> dict:
        return {"inference_mode": False}
