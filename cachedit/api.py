"""accelerate / disable / summary: validate everything, then apply reversible instance-scoped hooks."""

from __future__ import annotations

import copy
import functools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from diffusers.hooks import ModelHook

from . import config_file, hooks, lifecycle
from .adapters import Adapter, adapter_for, transformers_of
from .attention import TORCH_SDPA, AttentionRouter, needs_router, select_kernel
from .cache.dbcache import apply_cache, remove_cache
from .fusion import fuse_qkv, unfuse_qkv
from .parallel.cfg import apply_cfg_parallel, cfg_communicator, check_cfg_parallel, remove_cfg_parallel
from .parallel.context import apply_context_parallel, check_context_parallel, cp_mode, remove_context_parallel
from .parallel.controlnet import apply_controlnet_parallel, check_controlnet_parallel, remove_controlnet_parallel
from .parallel.tensor import (apply_tensor_parallel, check_tensor_parallel, hybrid_mesh, remove_tensor_parallel,
                              tensor_communicator, text_encoders_of)
from .parallel.tp_plans import tp_plan_for
from .parallel.vae import apply_vae_parallel, check_vae_parallel, remove_vae_parallel
from .quant.linear import Swapped, apply_quantization, quantizable, remove_quantization, weight_bytes
from .quant.spec import QuantSpec
from .backend import Backend
from .config import CacheConfig, CompileConfig, CompileTarget, ParallelConfig, QuantConfig, coerce
from .plugins import manager

STATE_ATTR = "_cachedit_state"
ATTENTION_HOOK = "cachedit.attention"
COMPILE_HOOK = "cachedit.compile"


class AttentionHook(ModelHook):
    """Runs the transformer's forward inside its `AttentionRouter`."""

    def __init__(self, router: AttentionRouter) -> None:
        super().__init__()
        self.router = router

    def new_forward(self, module: nn.Module, *args, **kwargs):
        with self.router:
            return self.fn_ref.original_forward(*args, **kwargs)


class CompileHook(ModelHook):
    """Runs a block's own forward compiled. Registered first, it is the innermost hook, so cache
    decisions made by outer hooks stay out of the compiled graphs."""

    def __init__(self, options: dict) -> None:
        super().__init__()
        self.options = options

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self.compiled = torch.compile(module.forward, **self.options)
        return module

    def new_forward(self, module: nn.Module, *args, **kwargs):
        return self.compiled(*args, **kwargs)


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
    caches: dict[str, list] = field(default_factory=dict)
    quantized: dict[str, Swapped] = field(default_factory=dict)
    context_parallel: dict = field(default_factory=dict)  # transformer name -> parallel.context.ContextParallel
    cfg_parallel: list = field(default_factory=list)  # transformer names
    tensor_parallel: dict = field(default_factory=dict)  # transformer name -> parallel.tensor.TensorParallel
    text_encoders: dict = field(default_factory=dict)  # text encoder name -> parallel.tensor.TensorParallel
    vae_parallel: Any = None  # parallel.vae.VaeParallel
    controlnet_parallel: Any = None  # parallel.controlnet.ControlNetParallel
    num_steps_override: int | None = None
    compile_options: dict = field(default_factory=dict)
    fused_qkv: dict = field(default_factory=dict)  # transformer name -> fusion.FusedQKV
    scope: Any = None  # lifecycle.Scope: per-call state starts fresh and is released at every call
    own_class: Any = None  # the per-instance class lifecycle.install gave the pipeline


def _head_dim(transformer: nn.Module) -> int | None:
    cfg = getattr(transformer, "config", {})
    for key in ("attention_head_dim", "head_dim"):
        value = cfg.get(key) if hasattr(cfg, "get") else None
        if isinstance(value, int):
            return value
        if isinstance(value, (tuple, list)) and value:
            return int(value[0]) if len(value) == 1 else None
    return None


def _execution_device(module: nn.Module) -> str | None:
    """Where an offloaded model computes: accelerate's offload hooks keep the weights elsewhere (on "meta"
    for sequential offload) and bring them to their `execution_device` for each call."""
    for m in module.modules():
        device = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device).type
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
        if param is not None and param.device.type != backend.device_type and _execution_device(t) != backend.device_type:
            raise ValueError(f"device={backend.name!r} runs on {backend.device_type!r} but pipe.{name} is on "
                             f"{param.device.type!r}; move it first, e.g. pipe.to({backend.device_type!r})")
        head_dim = _head_dim(t)
        if attention not in (None, "auto") or head_dim is not None:
            dtype = param.dtype if param is not None else torch.float32
            select_kernel(kernels, attention, dtype, head_dim or 64)
        if cache is not None:
            cache.check_stacks([len(stack) for stack in adapters[name].stacks(t)], f"pipe.{name}")
        already = _diffusers_cache(t)
        if already is not None:
            raise ValueError(f"pipe.{name} already runs diffusers' own cache ({already}); cachedit would stack "
                             f"its hooks on top of it; call pipe.{name}.disable_cache() first")
        if compile_cfg is not None:
            _check_compile_options(backend, adapters[name].family, compile_cfg)
    if parallel is not None and parallel.tensor > 1 and quantize is not None:  # it would swap the sharded linears
        raise ValueError(f"ParallelConfig.tensor={parallel.tensor} with quantize= is not supported; allowed: "
                         "quantize=None when tensor > 1 (or tensor=1 with quantize)")
    if parallel is not None and (parallel.tensor > 1 or parallel.text_encoder):
        check_tensor_parallel(transformers, parallel, text_encoders_of(pipe) if parallel.text_encoder else None)
    if parallel is not None and parallel.cfg > 1:
        if cache is not None and cache.branch_thresholds:  # the CFG ranks decide together, on one threshold
            raise ValueError(f"CacheConfig.branch_thresholds={cache.branch_thresholds} with ParallelConfig.cfg="
                             f"{parallel.cfg} is not supported; allowed: branch_thresholds={{}} when cfg > 1")
        check_cfg_parallel(parallel)
    if parallel is not None and cp_mode(parallel) is not None:
        check_context_parallel(transformers, parallel, kernels, attention, _head_dim)
    if parallel is not None:
        check_vae_parallel(pipe, parallel)
        check_controlnet_parallel(pipe, parallel, kernels, attention, _head_dim)
    if quantize is not None:
        spec = QuantSpec.from_config(quantize)
        if manager().quantized_linear(backend, spec) is None:
            raise ValueError(f"quantize: backend {backend.name!r} has no quantized linear path for scheme="
                             f"{spec.scheme!r}, granularity={spec.granularity!r}, weight_only={spec.weight_only}")
        for name, t in transformers.items():
            if not quantizable(t, quantize):
                raise ValueError(f"quantize.exclude={quantize.exclude} leaves no nn.Linear of pipe.{name} to quantize")
    return adapters


def _diffusers_cache(transformer: nn.Module) -> str | None:
    """The diffusers cache already on `transformer` (`enable_cache`, or a cache hook applied directly), or None."""
    config = getattr(transformer, "_cache_config", None)
    if config is not None:
        return type(config).__name__
    for module in transformer.modules():
        for hook in getattr(getattr(module, "_diffusers_hook", None), "hooks", {}).values():
            where = type(hook).__module__
            if where.startswith("diffusers.hooks.") and ("cache" in where or "broadcast" in where):
                return type(hook).__name__
    return None


def _check_compile_options(backend: Backend, family: str, config: CompileConfig) -> None:
    """Let torch.compile itself check the merged options on a stand-in function (it checks the backend,
    mode and inductor options when called, compiling nothing), so a bad one fails before any change."""
    options = manager().compile_options(backend, CompileTarget("transformer_block", family, config))
    options.pop("fuse_qkv", None)
    try:
        torch.compile(_identity, **options)
    except Exception as exc:
        field = ("backend" if type(exc).__name__ == "InvalidBackend" else
                 "mode" if str(exc).startswith("Unrecognized mode") else "options")
        raise ValueError(f"CompileConfig.{field}: torch.compile refuses {options} (the user's config merged with "
                         f"backend {backend.name!r}'s defaults): {str(exc)[:300]}") from None


def _identity(x):
    return x


def _attention_modules(transformer: nn.Module) -> list[nn.Module]:
    """Where the router is active: each attention module (diffusers attention modules carry a
    `processor`), so the per-op cost of the mode is paid inside attention only."""
    found = [m for m in transformer.modules() if hasattr(m, "processor") and m is not transformer]
    return found or [transformer]


def _invalidate_registry_cache(transformer: nn.Module) -> None:
    """diffusers caches which children carry hooks; cache_context must see the current ones."""
    if hasattr(transformer, "_diffusers_hook"):
        transformer._diffusers_hook.invalidate_child_registries_cache()


def accelerate(pipe, device: str = "auto", cache=None, parallel=None, quantize=None, compile=None,
               attention: str | None = None, config=None):
    """Make `pipe` faster in place and return it. Raises ValueError, with `pipe` untouched, on bad input.

    `config`: a YAML / JSON file or a dict with these same arguments (see `config_file`); arguments passed
    here win over the file's. `cache` may also name a file holding cache fields alone (a tuned config)."""
    if config is not None:
        args = config_file.merge(config_file.load(config), device=device, cache=cache, parallel=parallel,
                                 quantize=quantize, compile=compile, attention=attention)
        device, cache, parallel, quantize, compile, attention = (
            args[k] for k in ("device", "cache", "parallel", "quantize", "compile", "attention"))
        device = device or "auto"
    if config_file.is_file_reference(cache):
        cache = config_file.load_section(cache, CacheConfig, "cache")
    cache_cfg = coerce(cache, CacheConfig, "cache")
    parallel_cfg = coerce(parallel, ParallelConfig, "parallel")
    quant_cfg = coerce(quantize, QuantConfig, "quantize")
    compile_cfg = coerce(compile, CompileConfig, "compile")
    if attention is not None and not isinstance(attention, str):
        raise ValueError(f"attention={attention!r} is invalid; allowed values: None, 'auto' or a kernel name")
    backend = manager().resolve(device)
    adapters = _validate(pipe, backend, cache_cfg, parallel_cfg, quant_cfg, compile_cfg, attention)

    state = _Applied(backend, cache_cfg, parallel_cfg, quant_cfg, compile_cfg, attention, adapters)
    state.scope = lifecycle.Scope(lambda: [getattr(pipe, n) for n in state.adapters])
    setattr(pipe, STATE_ATTR, state)
    try:
        kernels = manager().attention_kernels(backend)
        tensor_parallel = parallel_cfg is not None and parallel_cfg.tensor > 1
        mesh = hybrid_mesh(parallel_cfg, backend.device_type) if parallel_cfg is not None else None
        for name, transformer in transformers_of(pipe).items():
            if compile_cfg is not None:
                target = CompileTarget("transformer_block", adapters[name].family, compile_cfg)
                state.compile_options = manager().compile_options(backend, target)
                fuse = state.compile_options.pop("fuse_qkv", False)
                if fuse and adapters[name].fuses_qkv and (parallel_cfg is None or parallel_cfg.tensor == 1):
                    state.fused_qkv[name] = fuse_qkv(transformer)  # before quantization: it quantizes the fused
            if quant_cfg is not None:
                path = manager().quantized_linear(backend, QuantSpec.from_config(quant_cfg))
                skip = set(state.fused_qkv[name].aliased) if name in state.fused_qkv else frozenset()
                state.quantized[name] = apply_quantization(transformer, quant_cfg, path, skip)
            context_parallel = parallel_cfg is not None and cp_mode(parallel_cfg) is not None
            param = next(transformer.parameters(), None)
            dtype = param.dtype if param is not None else torch.float32
            if context_parallel or needs_router(kernels, attention, dtype, _head_dim(transformer) or 64):
                router = AttentionRouter(kernels, attention)
                for module in _attention_modules(transformer):
                    hooks.attach(module, AttentionHook(router), ATTENTION_HOOK)
                state.routers[name] = router
            if tensor_parallel:  # after the router: the all-reduces run outside attention routing
                state.tensor_parallel[name] = apply_tensor_parallel(
                    transformer, tp_plan_for(transformer), tensor_communicator(backend, mesh))
            if compile_cfg is not None:
                for block in adapters[name].blocks(transformer):
                    hooks.attach(block, CompileHook(state.compile_options), COMPILE_HOOK)
                    state.compiled.append(block)
            if cache_cfg is not None:
                state.caches[name] = apply_cache(transformer, adapters[name], cache_cfg,
                                                 functools.partial(_num_steps, pipe), state.scope)
            if context_parallel:  # after the cache: its splits are outermost, its reduce agrees the caches
                state.context_parallel[name] = apply_context_parallel(
                    transformer, parallel_cfg, backend, state.routers[name], state.caches.get(name, []), mesh=mesh)
            if parallel_cfg is not None and parallel_cfg.cfg == 2:
                apply_cfg_parallel(transformer, cfg_communicator(backend, mesh), state.caches.get(name, []))
                state.cfg_parallel.append(name)
            _invalidate_registry_cache(transformer)
        if (state.context_parallel or parallel_cfg is not None and parallel_cfg.controlnet) and getattr(
                pipe, "controlnet", None) is not None:  # last: outermost
            state.controlnet_parallel = apply_controlnet_parallel(pipe, parallel_cfg, backend, kernels, attention,
                                                                  state.context_parallel, mesh=mesh)
        if parallel_cfg is not None and parallel_cfg.vae:
            state.vae_parallel = apply_vae_parallel(pipe.vae, backend, kernels)
        if parallel_cfg is not None and parallel_cfg.text_encoder:  # over every rank
            for name, encoder in text_encoders_of(pipe).items():
                state.text_encoders[name] = apply_tensor_parallel(encoder, tp_plan_for(encoder),
                                                                  tensor_communicator(backend))
        if state.caches or state.cfg_parallel:  # last: every call of the pipeline starts and ends its state
            state.own_class = lifecycle.install(pipe, state.scope, functools.partial(_drop_override, state))
    except BaseException:
        disable(pipe)
        raise
    return pipe


def disable(pipe):
    """Undo `accelerate` exactly: afterwards the pipeline computes bit for bit what it did before."""
    state: _Applied | None = getattr(pipe, STATE_ATTR, None)
    if state is None:
        return pipe
    for swapped in state.quantized.values():
        swapped.check_restorable()  # before anything is undone
    if state.own_class is not None:
        lifecycle.check_removable(pipe, state.own_class)
        lifecycle.remove(pipe, state.own_class)
    if state.vae_parallel is not None:
        remove_vae_parallel(state.vae_parallel)
    if state.controlnet_parallel is not None:
        remove_controlnet_parallel(state.controlnet_parallel)
    for name in state.cfg_parallel:
        remove_cfg_parallel(getattr(pipe, name))
    for cp in state.context_parallel.values():
        remove_context_parallel(cp)
    for name, caches in state.caches.items():
        remove_cache(getattr(pipe, name), caches)
    for block in state.compiled:
        hooks.detach(block, COMPILE_HOOK)
    for tp in (*state.text_encoders.values(), *state.tensor_parallel.values()):  # before the router: attached after
        remove_tensor_parallel(tp)
    for name in state.routers:
        for module in _attention_modules(getattr(pipe, name)):
            hooks.detach(module, ATTENTION_HOOK)
    for swapped in state.quantized.values():
        remove_quantization(swapped)
    for fused in state.fused_qkv.values():
        unfuse_qkv(fused)
    for transformer in transformers_of(pipe).values():
        _invalidate_registry_cache(transformer)
    delattr(pipe, STATE_ATTR)
    return pipe


def _num_steps(pipe) -> int | None:
    """This call's step count: a `refresh(pipe, num_inference_steps=N)` override, else the scheduler's."""
    state = getattr(pipe, STATE_ATTR, None)
    if state is not None and state.num_steps_override is not None:
        return state.num_steps_override
    timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
    return len(timesteps) if timesteps is not None else None


def _drop_override(state: _Applied) -> None:
    """A pipeline call knows its own step count: a `refresh`/`request` override does not outlive it."""
    state.num_steps_override = None


def _accelerated(pipe, what: str) -> _Applied:
    state: _Applied | None = getattr(pipe, STATE_ATTR, None)
    if state is None:
        raise ValueError(f"{what}(pipe): pipe is not accelerated; call cachedit.accelerate(pipe, ...) first")
    return state


def _check_steps(num_inference_steps) -> None:
    if num_inference_steps is not None and (isinstance(num_inference_steps, bool) or not isinstance(
            num_inference_steps, int) or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps={num_inference_steps!r} is invalid; allowed values: an integer >= 1")


def refresh(pipe, num_inference_steps: int | None = None):
    """Start fresh per-call state now (the manual override for transformers called directly; pipeline
    calls and `request` do it themselves); optionally fix the step count for step masks."""
    state = _accelerated(pipe, "refresh")
    _check_steps(num_inference_steps)
    state.num_steps_override = num_inference_steps
    lifecycle.reset(getattr(pipe, n) for n in state.adapters)
    return pipe


@contextmanager
def request(pipe, num_inference_steps: int | None = None):
    """One serving request of direct transformer calls: per-call state starts fresh on entry and is
    released on exit, however the block ends; `num_inference_steps` fixes the step count for step masks.

        with cachedit.request(pipe, num_inference_steps=28):
            for t in timesteps:
                noise = pipe.transformer(latents, timestep=t, ...)[0]
    """
    state = _accelerated(pipe, "request")
    _check_steps(num_inference_steps)
    state.num_steps_override = num_inference_steps
    try:
        with state.scope.run():
            yield pipe
    finally:
        state.num_steps_override = None


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


def summary(pipe) -> dict[str, Any]:
    """What accelerate applied to `pipe` and what happened since (kernel calls per transformer)."""
    state: _Applied | None = getattr(pipe, STATE_ATTR, None)
    if state is None:
        return {"accelerated": False}
    return copy.deepcopy({  # copies: editing the report cannot change a frozen config or a live hook
        "accelerated": True,
        "backend": state.backend.name,
        "plugin": state.backend.plugin,
        "families": {n: a.family for n, a in state.adapters.items()},
        "attention": {"requested": state.attention or "auto",
                      "kernels": {n: sorted({k.name for k in state.routers[n].chosen.values()})
                                  if n in state.routers else [TORCH_SDPA.name] for n in state.adapters},
                      "eager_calls": {n: dict(r.calls) for n, r in state.routers.items()}},
        "compile": None if state.compile is None else {
            "blocks": len(state.compiled), **state.compile_options,
            "fused_qkv_modules": {n: len(f.modules) for n, f in state.fused_qkv.items()}},
        "cache": None if state.cache is None else {
            "config": vars(state.cache), **{n: _cache_report(c) for n, c in state.caches.items()}},
        "parallel": None if state.parallel is None else vars(state.parallel),
        "vae_parallel": None if state.vae_parallel is None else state.vae_parallel.stats(),
        "controlnet_parallel": None if state.controlnet_parallel is None else state.controlnet_parallel.stats(),
        "tensor_parallel": {n: {"per_call": dict(tp.per_call), **tp.stats(), "weight_bytes": weight_bytes(tp.module)}
                            for n, tp in {**state.tensor_parallel, **state.text_encoders}.items()} or None,
        "quantize": None if state.quantize is None else {
            **vars(state.quantize), "linears": {n: len(q.places) for n, q in state.quantized.items()},
            "kept_in_float": {n: q.kept_in_float for n, q in state.quantized.items()},
            "fallbacks": {n: dict(q.fallbacks) for n, q in state.quantized.items()},
            "weight_bytes": {n: weight_bytes(getattr(pipe, n)) for n in state.quantized}},
    })
