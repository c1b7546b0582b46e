"""Ways to interrupt a pipeline call at a chosen point, shared by the reliability tests."""

from __future__ import annotations

from contextlib import contextmanager


class Abort(Exception):
    """What the tests raise to interrupt a call."""


def raise_at(step: int, error: BaseException):
    """A callback_on_step_end that raises `error` at the end of step `step` (on every rank alike)."""
    def callback(pipe, i, t, kwargs):
        if i == step:
            raise error
        return kwargs
    return callback


@contextmanager
def abort_at_call(transformer, index: int | None):
    """Raise Abort before the transformer's `index`-th call (None: never). A forward pre-hook runs before any
    cachedit hook, so with CFG parallelism every rank stops at the same call, before any exchange."""
    seen = []

    def pre_hook(module, args, kwargs):
        if len(seen) == index:
            raise Abort(f"transformer call {index}")
        seen.append(1)

    handle = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def interruptions(steps: int, calls_per_step: int):
    """(label, extra call kwargs, the error it raises, transformer call index) for every step index
    (callback_on_step_end raising KeyboardInterrupt) and every transformer call index (with two calls a
    step, odd indices fall between a step's "cond" and "uncond" calls)."""
    for k in range(steps):
        yield f"step {k}", dict(callback_on_step_end=raise_at(k, KeyboardInterrupt())), KeyboardInterrupt, None
    for c in range(steps * calls_per_step):
        yield f"transformer call {c}", {}, Abort, c
