"""The hooks a cachedit backend plugin implements. Each docstring is that hook's documentation.

A plugin is any module or object registered under the entry-point group `cachedit.plugins`
whose functions are marked with `cachedit.hookimpl`. Implementations may accept any subset of
a hook's arguments (pluggy passes by name), so specs can grow without breaking plugins. Every
hook except `cachedit_register_backends` receives the `Backend` being served: answer `None`
(or nothing) for backends you did not declare.
"""

from __future__ import annotations

import pluggy

PROJECT = "cachedit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def cachedit_register_backends(registry):
    """Declare backends with `registry.add(cachedit.Backend(...))`.

    Called once when plugins load. Must be cheap and must not initialise a device: put
    device probing inside the backend's `is_available()`, which returns `(ok, reason)`.
    """


@hookspec
def cachedit_attention_kernels(backend):
    """Return a list of `cachedit.attention.AttentionKernel` this plugin provides for `backend`.

    Each kernel declares its capabilities (dtypes, head dims, whether it returns the
    log-sum-exp, masks, causal, which context-parallel modes it can serve) and a priority.
    Kernels from every plugin are pooled; the core picks per call the highest-priority kernel
    whose capabilities fit, or the one the user named with `attention=`.
    """


@hookspec(firstresult=True)
def cachedit_communicator(backend, group):
    """Return a `cachedit.parallel.communicator.Communicator` for `group` on `backend`.

    `group` is a `torch.distributed.ProcessGroup` (or None for the default group). The first
    non-None answer wins; the core's trylast default wraps plain `torch.distributed`.
    """


@hookspec(firstresult=True)
def cachedit_quantized_linear(backend, spec):
    """Return a `cachedit.quant.spec.QuantizedLinearPath` able to run `spec` on `backend`, or None.

    `spec` is a `cachedit.quant.spec.QuantSpec` (scheme, granularity, dtypes). The path
    quantizes weights once and runs the linear; the first non-None answer wins.
    """


@hookspec
def cachedit_compile_options(backend, target):
    """Return a dict of `torch.compile` keyword arguments for `backend` and `target`.

    `target` is a `cachedit.config.CompileTarget` (what is being compiled and with which
    user config). Answers are merged in call order, later plugins overriding earlier ones; the
    core's trylast default supplies the baseline and the user's own `CompileConfig` wins last.
    One key is the core's, not torch.compile's: `fuse_qkv` (bool) fuses the attention q/k/v
    projections into one GEMM where the model supports it (the core default is False).
    """
