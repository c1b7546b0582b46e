"""accelerate / disable / summary: validate everything, then apply reversible instance-scoped hooks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from diffusers.hooks import ModelHook

from . import hooks
from .adapters import Adapter, adapter_for, transformers_of
from .attention import AttentionRouter, select_kernel
from .backend import Backend
from .config import CacheConfig, CompileConfig, CompileTarget, ParallelConfig, QuantConfig, coerce
from .plugins import manager

STATE_ATTR = "_cachedit_state"
ATTENTION_HOOK = "cachedit.attention"


class AttentionHook(ModelHook):
    """Runs the transformer's forward inside its `AttentionRouter`."""

    def __init__(self, router: AttentionRouter) -> None:
        super().__init__()
        self.router = router

    def new_forward(self, module: nn.Module, *args, **kwargs):
        with self.router:
            return self.fn_ref.original_forward(*args, **kwargs)


@dataclass
class _Applied:
    """Everything accelerate changed on one pipeline, so disable can undo exactly that."""

    backend: Backend
    cache: CacheConfig | None
    parallel: ParallelConfig | None
    quantize: QuantConfig | None
    compile: CompileConfig | None
    attention: str | None
    adapters: dict[str, Adapter]
    routers: dict[str, AttentionRouter] = field(default_factory=dict)
    compiled: list[nn.Module] = field(default_factory=list)
    compile_options: dict = field(default_factory=dict)


def _head_dim(transformer: nn.Module) -> int | None:
    cfg = getattr(transformer, "config", {})
    for key in ("attention_head_dim", "head_dim"):
        value = cfg.get(key) if hasattr(cfg, "get") else None
        if isinstance(value, int):
            return value
        if isinstance(value, (tuple, list)) and value:
            return int(value[0]) if len(value) == 1 else None
    return None


def _validate(pipe, backend: Backend, cache, parallel, quantize, compile_cfg, attention) -> dict[str, Adapter]:
    """Every check that can fail, before anything is modified."""
    if getattr(pipe, STATE_ATTR, None) is not None:
        raise ValueError("pipe is already accelerated; call cachedit.disable(pipe) first")
    transformers = transformers_of(pipe)
    if not transformers:
        raise ValueError(f"pipe ({type(pipe).__name__}) has no `transformer` component to accelerate")
    adapters = {name: adapter_for(t) for name, t in transformers.items()}
    kernels = manager().attention_kernels(backend)
    for name, t in transformers.items():
        param = next(t.parameters(), None)
        if param is not None and param.device.type != backend.device_type:
            raise ValueError(f"device={backend.name!r} runs on {backend.device_type!r} but pipe.{name} is on "
                             f"{param.device.type!r}; move it first, e.g. pipe.to({backend.device_type!r})")
        head_dim = _head_dim(t)
        if attention not in (None, "auto") or head_dim is not None:
            dtype = param.dtype if param is not None else torch.float32
            select_kernel(kernels, attention, dtype, head_dim or 64)
        if cache is not None:
            cache.check_blocks(len(adapters[name].blocks(t)))
    if cache is not None:
        raise NotImplementedError("cache= is declared and validated, but cache policies are not implemented yet "
                                  "(tracked in the hybrid-cache issue); pass cache=None")
    if parallel is not None and parallel.enabled:
        raise NotImplementedError("parallel= with degrees above 1 is not implemented yet (tracked in the context- "
                                  "and tensor-parallel issues); pass parallel=None")
    if quantize is not None:
        raise NotImplementedError("quantize= is declared and validated, but quantized linears are not applied yet "
                                  "(tracked in the accelerator-backends issue); pass quantize=None")
    return adapters


def accelerate(pipe, device: str = "auto", cache=None, parallel=None, quantize=None, compile=None,
               attention: str | None = None):
    """Make `pipe` faster in place and return it. Raises ValueError, with `pipe` untouched, on bad input."""
    cache_cfg = coerce(cache, CacheConfig, "cache")
    parallel_cfg = coerce(parallel, ParallelConfig, "parallel")
    quant_cfg = coerce(quantize, QuantConfig, "quantize")
    compile_cfg = coerce(compile, CompileConfig, "compile")
    if attention is not None and not isinstance(attention, str):
        raise ValueError(f"attention={attention!r} is invalid; allowed values: None, 'auto' or a kernel name")
    backend = manager().resolve(device)
    adapters = _validate(pipe, backend, cache_cfg, parallel_cfg, quant_cfg, compile_cfg, attention)

    state = _Applied(backend, cache_cfg, parallel_cfg, quant_cfg, compile_cfg, attention, adapters)
    setattr(pipe, STATE_ATTR, state)
    try:
        kernels = manager().attention_kernels(backend)
        for name, transformer in transformers_of(pipe).items():
            router = AttentionRouter(kernels, attention)
            hooks.attach(transformer, AttentionHook(router), ATTENTION_HOOK)
            state.routers[name] = router
            if compile_cfg is not None:
                target = CompileTarget("transformer_block", adapters[name].family, compile_cfg)
                state.compile_options = manager().compile_options(backend, target)
                for block in adapters[name].blocks(transformer):
                    block.compile(**state.compile_options)
                    state.compiled.append(block)
    except BaseException:
        disable(pipe)
        raise
    return pipe


def disable(pipe):
    """Undo `accelerate` exactly: afterwards the pipeline computes bit for bit what it did before."""
    state: _Applied | None = getattr(pipe, STATE_ATTR, None)
    if state is None:
        return pipe
    for block in state.compiled:
        block._compiled_call_impl = None
    for name in state.routers:
        hooks.detach(getattr(pipe, name), ATTENTION_HOOK)
    delattr(pipe, STATE_ATTR)
    return pipe


def summary(pipe) -> dict[str, Any]:
    """What accelerate applied to `pipe` and what happened since (kernel calls per transformer)."""
    state: _Applied | None = getattr(pipe, STATE_ATTR, None)
    if state is None:
        return {"accelerated": False}
    return {
        "accelerated": True,
        "backend": state.backend.name,
        "plugin": state.backend.plugin,
        "families": {n: a.family for n, a in state.adapters.items()},
        "attention": {"requested": state.attention or "auto",
                      "kernels": {n: sorted({k.name for k in r.chosen.values()}) for n, r in state.routers.items()},
                      "eager_calls": {n: dict(r.calls) for n, r in state.routers.items()}},
        "compile": None if state.compile is None else {"blocks": len(state.compiled), **state.compile_options},
        "cache": None if state.cache is None else vars(state.cache),
        "parallel": None if state.parallel is None else vars(state.parallel),
        "quantize": None if state.quantize is None else vars(state.quantize),
    }
