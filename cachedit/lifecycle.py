"""The lifecycle of per-call state: fresh at the start of every pipeline call (or serving request),
released on the way out however the call ends (returns, raises, KeyboardInterrupt).

Per-call state (cache states and calibrator histories, the rotary memo, the CFG-parallel exchange,
step counters) lives in stateful diffusers hooks; `reset` is diffusers' own reset of them
(`HookRegistry.reset_stateful_hooks`, what `maybe_free_model_hooks` runs at the end of a call that
returns). What diffusers lacks is the start of a call and the way out of one that fails, so an aborted
call used to hand its half-finished state to the next one.

How a call is intercepted: a per-instance subclass. `install` gives this one pipeline object a class
of its own, derived from its class, whose `__call__` is the original one inside `Scope.run` (a
try/finally); `remove` gives the object its class back. No class is modified: the original class's
`__call__`, other pipelines of that class and pipelines created later are untouched; the subclass keeps
the class's name, module and signature (`save_pretrained`, `isinstance`, `inspect.signature(pipe)` see
what they saw). Weighed against it:
- wrapping `pipe.scheduler.set_timesteps` on the instance marks a start but never an exit (a failed
  call still leaks its state); pipelines may call it more than once per call (img2img, multi-stage),
  users call it outside calls, and the scheduler is a swappable component (`pipe.scheduler = ...`)
  that several pipelines may share;
- an instance attribute `pipe.__call__` is never used: Python looks `__call__` up on the type;
- wrapping `pipe.progress_bar` (the denoising loop's context manager) sees start and exit, but not every
  pipeline uses it as a context manager (some iterate it, some never close it).

`Scope` also tells the cache hooks whether call boundaries are known (a pipeline call or an explicit
`cachedit.request` is in progress); when they are not (a transformer called directly), the hooks infer
where a denoising run starts from its timesteps (see `cache/dbcache.py`).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable

import torch.nn as nn

from . import inference
from ._diffusers_compat import child_registries, hook_registry


def reset(modules) -> None:
    """Reset every stateful diffusers hook on `modules` and their children: diffusers' own end-of-call reset,
    over the child registries diffusers keeps for `cache_context` (no walk of the module tree)."""
    for module in modules:
        registry = hook_registry(module)
        if registry is not None:
            for child in (registry, *child_registries(registry)):
                child.reset_stateful_hooks(recurse=False)


class Scope:
    """Whether a pipeline call or a request is in progress on one pipeline, and its fresh start and release."""

    def __init__(self, modules: Callable[[], list[nn.Module]]) -> None:
        self.modules = modules  # the hooked transformers, looked up when needed (components can be replaced)
        self.depth = 0

    @property
    def active(self) -> bool:
        return self.depth > 0

    @contextmanager
    def run(self):
        reset(self.modules())
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            reset(self.modules())


def install(pipe, scope: Scope, on_call: Callable[[], None] | None = None, inference_mode: bool = False) -> type:
    """Give `pipe` a class of its own whose `__call__` runs inside `scope.run()` (and, where `inference_mode`,
    under `torch.inference_mode`, see `inference.py`); returns that class. `on_call` runs first at every call
    (e.g. to drop a step-count override)."""
    original = type(pipe)
    call = original.__call__

    @functools.wraps(call)
    def __call__(self, *args, **kwargs):
        if on_call is not None:
            on_call()
        with scope.run(), inference.mode(self, inference_mode) as on:
            output = call(self, *args, **kwargs)
        return inference.as_normal(output) if on else output

    own = type(original.__name__, (original,), {
        "__call__": __call__, "__module__": original.__module__, "__qualname__": original.__qualname__,
        "__doc__": original.__doc__, "_cachedit_original_class": original})
    pipe.__class__ = own
    return own


def check_removable(pipe, own: type) -> None:
    """Before anything is undone: `pipe` still has the class `install` gave it (RuntimeError otherwise)."""
    if type(pipe) is not own:
        raise RuntimeError(f"cachedit.disable: pipe's class was changed to {type(pipe).__qualname__} after "
                           "cachedit.accelerate; undo that change first")


def remove(pipe, own: type) -> None:
    """Give `pipe` back the class it had before `install`."""
    if type(pipe) is own:
        pipe.__class__ = own._cachedit_original_class
