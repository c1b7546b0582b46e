"""accelerate / disable / summary: a thin sequencer over the declared features (`features/`).

`accelerate` checks the pipeline and runs every feature's check before anything is modified, then applies
the features in their one order (`features.FEATURES`), keeping each `Applied` record; a failure removes what
was applied, in reverse. `disable` removes the records in reverse; `summary` merges their stats."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any

from . import config_file, lifecycle
from ._diffusers_compat import invalidate_child_registries
from .config import CacheConfig, CompileConfig, ParallelConfig, QuantConfig, coerce
from .features import FEATURES, Applied, Context
from .features.pipeline import check_pipeline
from .plugins import manager

STATE_ATTR = "_cachedit_state"


def _invalidate_registry_caches(ctx: Context) -> None:
    """diffusers caches which children carry hooks; cache_context must see the current ones."""
    for transformer in ctx.transformers().values():
        invalidate_child_registries(transformer)


def accelerate(pipe, device: str = "auto", cache=None, parallel=None, quantize=None, compile=None,
               attention: str | None = None, config=None, inference_mode: bool | None = None):
    """Make `pipe` faster in place and return it. Raises ValueError, with `pipe` untouched, on bad input.

    `inference_mode`: pipeline calls run under `torch.inference_mode` (None: on; bitwise the same outputs,
    returned as normal tensors; off by itself while offloading moves parameters, see `inference.py`).

    `config`: a YAML / JSON file or a dict with these same arguments (see `config_file`); arguments passed
    here win over the file's. `cache` may also name a file holding cache fields alone (a tuned config)."""
    if config is not None:
        args = config_file.merge(config_file.load(config), device=device, cache=cache, parallel=parallel,
                                 quantize=quantize, compile=compile, attention=attention,
                                 inference_mode=inference_mode)
        device, cache, parallel, quantize, compile, attention, inference_mode = (
            args[k] for k in ("device", "cache", "parallel", "quantize", "compile", "attention", "inference_mode"))
        device = device or "auto"
    if config_file.is_file_reference(cache):
        cache = config_file.load_section(cache, CacheConfig, "cache")
    configs = dict(cache=coerce(cache, CacheConfig, "cache"), parallel=coerce(parallel, ParallelConfig, "parallel"),
                   quantize=coerce(quantize, QuantConfig, "quantize"),
                   compile=coerce(compile, CompileConfig, "compile"))
    if attention is not None and not isinstance(attention, str):
        raise ValueError(f"attention={attention!r} is invalid; allowed values: None, 'auto' or a kernel name")
    if inference_mode is not None and not isinstance(inference_mode, bool):
        raise ValueError(f"inference_mode={inference_mode!r} is invalid; allowed values: None, True, False")
    plugins = manager()
    backend = plugins.resolve(device)
    if getattr(pipe, STATE_ATTR, None) is not None:
        raise ValueError("pipe is already accelerated; call cachedit.disable(pipe) first")
    ctx = Context(pipe, backend, plugins, attention=attention, adapters=check_pipeline(pipe, backend),
                  inference_mode=inference_mode is not False, **configs)
    for feature in FEATURES:
        feature.check(ctx)  # pure: nothing has changed yet

    setattr(pipe, STATE_ATTR, ctx)
    try:
        ctx.mesh  # noqa: B018  the mesh's process groups, made by every rank before any feature applies
        for feature in FEATURES:
            if feature.wanted(ctx):
                ctx.records.append(feature.apply(ctx))
        _invalidate_registry_caches(ctx)
    except BaseException:
        _remove_all(ctx)
        raise
    return pipe


def _remove_all(ctx: Context) -> None:
    while ctx.records:
        ctx.records.pop().remove()
    _invalidate_registry_caches(ctx)
    delattr(ctx.pipe, STATE_ATTR)


def disable(pipe):
    """Undo `accelerate` exactly: afterwards the pipeline computes bit for bit what it did before."""
    ctx: Context | None = getattr(pipe, STATE_ATTR, None)
    if ctx is None:
        return pipe
    for record in ctx.records:
        record.check_removable()  # before anything is undone
    _remove_all(ctx)
    return pipe


def is_accelerated(pipe) -> bool:
    """Whether `cachedit.accelerate` applied to `pipe` (and `disable` has not undone it)."""
    return getattr(pipe, STATE_ATTR, None) is not None


def applied(pipe) -> dict[str, Applied]:
    """The features applied to `pipe`, in the order applied: feature name -> its record (`.parts` by
    component, `.stats()`); empty when `pipe` is not accelerated."""
    ctx: Context | None = getattr(pipe, STATE_ATTR, None)
    return {r.name: r for r in ctx.records} if ctx is not None else {}


def _accelerated(pipe, what: str) -> Context:
    ctx: Context | None = getattr(pipe, STATE_ATTR, None)
    if ctx is None:
        raise ValueError(f"{what}(pipe): pipe is not accelerated; call cachedit.accelerate(pipe, ...) first")
    return ctx


def _check_steps(num_inference_steps) -> None:
    if num_inference_steps is not None and (isinstance(num_inference_steps, bool) or not isinstance(
            num_inference_steps, int) or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps={num_inference_steps!r} is invalid; allowed values: an integer >= 1")


def refresh(pipe, num_inference_steps: int | None = None):
    """Start fresh per-call state now (the manual override for transformers called directly; pipeline
    calls and `request` do it themselves); optionally fix the step count for step masks."""
    ctx = _accelerated(pipe, "refresh")
    _check_steps(num_inference_steps)
    ctx.num_steps_override = num_inference_steps
    lifecycle.reset(ctx.transformers().values())
    return pipe


@contextmanager
def request(pipe, num_inference_steps: int | None = None):
    """One serving request of direct transformer calls: per-call state starts fresh on entry and is
    released on exit, however the block ends; `num_inference_steps` fixes the step count for step masks.

        with cachedit.request(pipe, num_inference_steps=28):
            for t in timesteps:
                noise = pipe.transformer(latents, timestep=t, ...)[0]
    """
    ctx = _accelerated(pipe, "request")
    _check_steps(num_inference_steps)
    ctx.num_steps_override = num_inference_steps
    try:
        with ctx.scope.run():
            yield pipe
    finally:
        ctx.num_steps_override = None


def _merge(out: dict, sections: dict) -> None:
    """Summary sections: a section two features report is merged; None (not applied) never hides one."""
    for key, value in sections.items():
        if value is None:
            out.setdefault(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value


def summary(pipe) -> dict[str, Any]:
    """What accelerate applied to `pipe` and what happened since (kernel calls per transformer)."""
    ctx: Context | None = getattr(pipe, STATE_ATTR, None)
    if ctx is None:
        return {"accelerated": False}
    out = {"accelerated": True, "backend": ctx.backend.name, "plugin": ctx.backend.plugin,
           "families": {n: a.family for n, a in ctx.adapters.items()},
           "parallel": None if ctx.parallel is None else vars(ctx.parallel)}
    records = {r.name: r for r in ctx.records}
    for feature in FEATURES:
        record = records.get(feature.name)
        _merge(out, record.stats() if record is not None else feature.idle(ctx))
    return copy.deepcopy(out)  # editing the report cannot change a frozen config or a live hook
