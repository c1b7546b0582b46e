"""Quantized linears (`quant/`): the backend's FP8 / INT8 path swapped in for each nn.Linear."""

from __future__ import annotations

from ..quant.linear import apply_quantization, quantizable, remove_quantization, weight_bytes
from ..quant.spec import QuantSpec
from .base import Applied, Context, Feature


class Quantize(Feature):
    name = "quantize"

    def check(self, ctx: Context) -> None:
        q, parallel = ctx.quantize, ctx.parallel
        if q is None:
            return
        if parallel is not None and parallel.tensor > 1:  # it would swap the sharded linears
            raise ValueError(f"ParallelConfig.tensor={parallel.tensor} with quantize= is not supported; allowed: "
                             "quantize=None when tensor > 1 (or tensor=1 with quantize)")
        spec = QuantSpec.from_config(q)
        if ctx.plugins.quantized_linear(ctx.backend, spec) is None:
            raise ValueError(f"quantize: backend {ctx.backend.name!r} has no quantized linear path for scheme="
                             f"{spec.scheme!r}, granularity={spec.granularity!r}, weight_only={spec.weight_only}")
        for name, t in ctx.transformers().items():
            if not quantizable(t, q):
                raise ValueError(f"quantize.exclude={q.exclude} leaves no nn.Linear of pipe.{name} to quantize")

    def wanted(self, ctx: Context) -> bool:
        return ctx.quantize is not None

    def apply(self, ctx: Context) -> Applied:
        path = ctx.plugins.quantized_linear(ctx.backend, QuantSpec.from_config(ctx.quantize))
        record = Applied(self.name, report=lambda: self._report(ctx, record.parts))
        with record.building():
            for name, transformer in ctx.transformers().items():
                fused = ctx.part("fuse_qkv", name)  # its separate linears alias the fused one: not swapped
                swapped = record.parts[name] = apply_quantization(
                    transformer, ctx.quantize, path, set(fused.aliased) if fused is not None else frozenset())
                record.undo.append(lambda s=swapped: remove_quantization(s))
                record.prechecks.append(swapped.check_restorable)
        return record

    def idle(self, ctx: Context) -> dict:
        return {"quantize": None}

    @staticmethod
    def _report(ctx: Context, parts: dict) -> dict:
        return {"quantize": {
            **vars(ctx.quantize), "linears": {n: len(q.places) for n, q in parts.items()},
            "kept_in_float": {n: q.kept_in_float for n, q in parts.items()},
            "fallbacks": {n: dict(q.fallbacks) for n, q in parts.items()},
            "weight_bytes": {n: weight_bytes(getattr(ctx.pipe, n)) for n in parts}}}
