"""The hooks a cachedit backend plugin implements. Each docstring is that hook's documentation.

A plugin is any module or object registered under the entry-point group `cachedit.plugins`
whose functions are marked with `cachedit.hookimpl`. Implementations may accept any subset of
a hook's arguments (pluggy passes by name), so specs can grow without breaking plugins.

Routing: a question about a backend (every hook but the two registration hooks) goes only to
the plugin that declared that backend (the winner when several declared the same name), to
plugins that declare no backend at all (extensions: they see every backend), and to the core's
`trylast` defaults. A plugin therefore never needs to check `backend.name`. Hooks are called
through pluggy's own hook callers, so `firstresult`, `tryfirst` / `trylast` and hook wrappers
(`wrapper=True`) behave as pluggy documents them.

Answers are checked at the boundary: an implementation that raises (anything but
KeyboardInterrupt, `sys.exit()` included) or answers with the wrong type is recorded against its
plugin like a load failure, and the plugin is ignored from then on (see `cachedit.plugins`).
A misspelled hook name is reported as an unknown hook; mark a hook that only newer cachedit
versions know with `@cachedit.hookimpl(optionalhook=True)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch.distributed

    from .attention import AttentionKernel
    from .backend import Backend, BackendRegistry
    from .config import CompileTarget
    from .models import ModelRegistries
    from .parallel.communicator import Communicator
    from .quant.spec import QuantizedLinearPath, QuantSpec

PROJECT = "cachedit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(historic=True)
def cachedit_register_backends(registry: BackendRegistry) -> None:
    """Declare backends with ``registry.add(cachedit.Backend(...))``.

    :param registry: collects the declarations; each is recorded against the declaring plugin.

    Historic: a plugin registered after loading (``manager().register(plugin, name)``) is asked
    too. Must be cheap and must not initialise a device: put device probing inside the backend's
    ``is_available()``, which returns ``(ok, reason)``. Return nothing.
    """


@hookspec(historic=True)
def cachedit_register_models(registry: ModelRegistries) -> None:
    """Ship support for model families: adapters, block IO, context- and tensor-parallel plans.

    :param registry: a `cachedit.models.ModelRegistries`; register with
        ``registry.adapters.register(transformer_class_name, cachedit.adapters.Adapter(...))``,
        ``registry.block_io.register(block_class_name, cachedit.adapters.BlockIO(...))``,
        ``registry.cp_plans.register(class_name, build)`` and ``registry.tp_plans.register(class_name, build)``
        (``build(module)`` returns a `cachedit.parallel.plans.CPPlan` / `cachedit.parallel.tp_plans.TPPlan`).

    Each registration is recorded against this plugin: it replaces a same-named entry while the
    plugin is loaded, and the entry it replaced serves again if the plugin fails. Historic, like
    `cachedit_register_backends`. Registries are imported on first access, so a plugin that ships
    no model costs nothing. An exception here is recorded against the plugin, which is then
    ignored (its backends and models with it). Return nothing.
    """


@hookspec
def cachedit_attention_kernels(backend: Backend) -> list[AttentionKernel] | None:
    """The attention kernels this plugin provides for `backend`.

    :param backend: the backend being served (one this plugin declared, or any for an extension).
    :returns: a list of `cachedit.AttentionKernel`, or None for none.

    Each kernel declares its capabilities (dtypes, head dims, whether it returns the
    log-sum-exp, masks, causal, which context-parallel modes it can serve) and a priority.
    The answers of the owner, the extensions and the core's default (torch SDPA) are pooled;
    the core picks per call the highest-priority kernel whose capabilities fit, or the one the
    user named with `attention=`.
    """


@hookspec(firstresult=True)
def cachedit_communicator(backend: Backend, group: torch.distributed.ProcessGroup | None) -> Communicator | None:
    """The collectives the parallel plans use over `group` on `backend`.

    :param backend: the backend being served.
    :param group: a `torch.distributed.ProcessGroup`, or None for the default group.
    :returns: a `cachedit.parallel.communicator.Communicator` (a subclass of it), or None.

    The first non-None answer wins; the core's trylast default wraps plain `torch.distributed`.
    """


@hookspec(firstresult=True)
def cachedit_quantized_linear(backend: Backend, spec: QuantSpec) -> QuantizedLinearPath | None:
    """A quantized linear path able to run `spec` on `backend`.

    :param backend: the backend being served.
    :param spec: a `cachedit.quant.spec.QuantSpec` (scheme, granularity, weight_only).
    :returns: a `cachedit.quant.spec.QuantizedLinearPath` (a subclass of it), or None when this
        plugin cannot serve `spec`.

    The path quantizes weights once and runs the linear; the first non-None answer wins.
    """


@hookspec
def cachedit_compile_options(backend: Backend, target: CompileTarget) -> dict[str, Any] | None:
    """`torch.compile` keyword arguments for `backend` and `target`.

    :param backend: the backend being served.
    :param target: a `cachedit.config.CompileTarget` (what is being compiled, with the user's config).
    :returns: a dict whose keys are `torch.compile` parameters (``backend``, ``mode``,
        ``options``, ``fullgraph``, ``dynamic``, ``disable``) or ``fuse_qkv``, or None.

    Answers are merged in call order, later plugins overriding earlier ones; the core's trylast
    default supplies the baseline and the user's own `CompileConfig` wins last. ``fuse_qkv``
    (bool) is the core's key, not torch.compile's: it fuses the attention q/k/v projections
    into one GEMM where the model supports it (the core default is False).
    """
