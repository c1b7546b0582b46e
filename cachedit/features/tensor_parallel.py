"""Tensor parallelism (`parallel/tensor.py`) of the transformers (`ParallelConfig.tensor`) and of the text
encoders (`ParallelConfig.text_encoder`, over every rank). After the router: the all-reduces run outside
attention routing. While applied, `pipe.load_lora_weights` loads into the sharded models (`tp_load.py`)."""

from __future__ import annotations

from ..parallel import tp_load
from ..parallel.metering import MeteredCommunicator
from ..parallel.tensor import apply_tensor_parallel, check_tensor_parallel, remove_tensor_parallel, text_encoders_of
from ..parallel.tp_plans import tp_plan_for
from ..quant.linear import weight_bytes
from .base import Applied, Context, Feature


class TensorParallel(Feature):
    name = "tensor_parallel"

    def check(self, ctx: Context) -> None:
        p = ctx.parallel
        if p is not None and (p.tensor > 1 or p.text_encoder):
            check_tensor_parallel(ctx.transformers(), p, text_encoders_of(ctx.pipe) if p.text_encoder else None)

    def wanted(self, ctx: Context) -> bool:
        return ctx.parallel is not None and (ctx.parallel.tensor > 1 or ctx.parallel.text_encoder)

    def apply(self, ctx: Context) -> Applied:
        record = Applied(self.name, report=lambda: self._report(record.parts))
        modules = dict(ctx.transformers()) if ctx.parallel.tensor > 1 else {}
        groups = dict.fromkeys(modules, ctx.group("tensor"))
        if ctx.parallel.text_encoder:  # over every rank
            encoders = text_encoders_of(ctx.pipe)
            modules.update(encoders)
            groups.update(dict.fromkeys(encoders))
        with record.building():
            for name, module in modules.items():
                comm = MeteredCommunicator(ctx.communicator(groups[name]))
                tp = record.parts[name] = apply_tensor_parallel(module, tp_plan_for(module), comm)
                record.undo.append(lambda tp=tp: remove_tensor_parallel(tp))
            record.undo.append(tp_load.install(ctx.pipe, record.parts))  # LoRA loaded after: re-sharded
        return record

    def idle(self, ctx: Context) -> dict:
        return {"tensor_parallel": None}

    @staticmethod
    def _report(parts: dict) -> dict:
        return {"tensor_parallel": {
            n: {"per_call": dict(tp.per_call), **tp.stats(), "weight_bytes": weight_bytes(tp.module)}
            for n, tp in parts.items()} or None}
