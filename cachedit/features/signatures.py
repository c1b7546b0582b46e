"""Processor signatures looked up once (`signatures.py`): diffusers' per-attention-call
`inspect.signature` made an attribute read. Not under compile: the compiled graphs run no Python
per call, and dynamo traces `inspect` itself."""

from __future__ import annotations

from ..signatures import sign, unsign
from .base import Applied, Context, Feature


class Signatures(Feature):
    name = "signatures"

    def wanted(self, ctx: Context) -> bool:
        return ctx.compile is None and bool(ctx.transformers())

    def apply(self, ctx: Context) -> Applied:
        record = Applied(self.name, report=lambda: self._report(record.parts))
        with record.building():
            for name, transformer in ctx.transformers().items():
                signed = record.parts[name] = sign(transformer)
                record.undo.append(lambda signed=signed: unsign(signed))
        return record

    def idle(self, ctx: Context) -> dict:
        return self._report({})

    @staticmethod
    def _report(parts: dict) -> dict:
        return {"signatures": {"signed_processors": {n: len(s) for n, s in parts.items()}}}
