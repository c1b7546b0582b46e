"""The VAE's decode split in bands over every rank (`parallel/vae.py`)."""

from __future__ import annotations

from ..parallel.vae import apply_vae_parallel, check_vae_parallel, remove_vae_parallel
from .base import Applied, Context, Feature


class VaeParallel(Feature):
    name = "vae_parallel"

    def check(self, ctx: Context) -> None:
        if ctx.parallel is not None:
            check_vae_parallel(ctx.pipe, ctx.parallel)

    def wanted(self, ctx: Context) -> bool:
        return ctx.parallel is not None and ctx.parallel.vae

    def apply(self, ctx: Context) -> Applied:
        vp = apply_vae_parallel(ctx.pipe.vae, ctx.communicator(None), ctx.kernels)
        return Applied(self.name, parts={"vae": vp}, report=lambda: {"vae_parallel": vp.stats()},
                       undo=[lambda: remove_vae_parallel(vp)])

    def idle(self, ctx: Context) -> dict:
        return {"vae_parallel": None}
