"""The one facade over pluggy: load plugins in isolation, route each backend's questions, check the answers.

Loading. Plugins come from the entry-point group `cachedit.plugins`. CACHEDIT_PLUGINS selects
them by entry-point name: "cpu_ref,cuda" loads only those, "-ascend" loads all but that one.
Registering a plugin is what asks it for its backends: `cachedit_register_backends` is a
historic hook, so a plugin registered at any time (`manager().register(plugin, name)`) is asked,
one plugin at a time, and one failure stays local. `cachedit_register_models` (historic too) lets a
plugin ship model support into the adapter, block-IO and CP / TP plan registries; each entry is
recorded against the plugin and forgotten with it. Those registries cannot import this module (it
imports them), so this module installs `_load_plugin_models` in `cachedit.model_lookup`: a lookup
of a model loads the plugins first.

Routing. Hooks are called through pluggy's own hook callers, so `firstresult`, `tryfirst` /
`trylast` and hook wrappers behave as pluggy documents them. A question about backend B goes,
through `subset_hook_caller`, to the plugin that declared B (the winner when several did), to
plugins that declare no backend (extensions, which see every backend) and to the built-in
defaults; never to a plugin that declared another backend. Plugins need no name guards, and a
plugin overriding a backend by name serves it alone.

Isolation. pluggy registers a `_Guarded` view of each plugin whose hook functions are the
plugin's own, each wrapped by `_guard`: an exception (any BaseException but KeyboardInterrupt,
so a plugin's `sys.exit()` is contained too, while Ctrl-C still stops the program) or an answer
of the wrong type becomes a `PluginFault` naming the plugin. The guard is per implementation
rather than a pluggy hook wrapper because a wrapper sees one exception, or a list of answers,
without knowing which plugin produced it. A faulty plugin is recorded in `failed` like a load
failure, unregistered with its backends, and warned about. Asked about a backend it owned, that
is a `PluginError` naming it; any other question is asked again without it. An import that
fails, an invalid hook signature, an unknown (misspelled) hook and an entry-point name claimed by
two plugins are recorded the same way. CACHEDIT_STRICT_PLUGINS=1 makes every fault a PluginError.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import os
import traceback
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable

import pluggy

from . import hookspecs, model_lookup
from .backend import Backend, BackendRegistry, PluginRecord, declaring_plugin
from .models import ModelRegistries

if TYPE_CHECKING:
    from .attention import AttentionKernel
    from .config import CompileTarget
    from .parallel.communicator import Communicator
    from .quant.spec import QuantizedLinearPath, QuantSpec

ENTRY_POINT_GROUP = "cachedit.plugins"
ENV_SELECT = "CACHEDIT_PLUGINS"
ENV_STRICT = "CACHEDIT_STRICT_PLUGINS"
BUILTIN = "builtin"
SPEC_NAMES = tuple(sorted(n for n in dir(hookspecs) if n.startswith("cachedit_")))


class PluginError(RuntimeError):
    """A plugin failed while strict mode was on, or the plugin serving the backend asked about failed."""


class PluginFault(Exception):
    """Raised by a guarded hook implementation: `plugin` raised, or answered `hook` wrongly."""

    def __init__(self, plugin: str, hook: str, problem: str) -> None:
        super().__init__(f"plugin {plugin!r} {problem}")
        self.plugin, self.hook, self.problem = plugin, hook, problem


def _strict() -> bool:
    return os.environ.get(ENV_STRICT, "").strip().lower() in {"1", "true", "yes", "on"}


def _selection() -> tuple[set[str] | None, set[str]]:
    """Parse CACHEDIT_PLUGINS into (allowlist or None, blocklist)."""
    raw = [p.strip() for p in os.environ.get(ENV_SELECT, "").split(",") if p.strip()]
    blocked = {p[1:] for p in raw if p.startswith("-")}
    allowed = {p for p in raw if not p.startswith("-")}
    return (allowed or None), blocked


def _short_error(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" ({last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


# -- answers, checked at the boundary ------------------------------------------------------------------------------
def _kernel_problem(kernel: Any) -> str:
    import torch

    from .attention import CP_MODES, AttentionKernel

    if not isinstance(kernel, AttentionKernel):
        return f"a {type(kernel).__name__} ({kernel!r:.60}) among the kernels; expected cachedit.AttentionKernel"
    where = f"kernel {kernel.name!r}: "
    if not isinstance(kernel.name, str) or not kernel.name:
        return f"a kernel named {kernel.name!r}; expected a non-empty string"
    if not callable(kernel.fn):
        return where + f"fn={kernel.fn!r:.60} is not callable"
    if isinstance(kernel.priority, bool) or not isinstance(kernel.priority, int):
        return where + f"priority={kernel.priority!r} is not an int"
    if not isinstance(kernel.dtypes, (set, frozenset)) or not all(isinstance(d, torch.dtype) for d in kernel.dtypes):
        return where + f"dtypes={kernel.dtypes!r:.60} is not a set of torch dtypes"
    dims = kernel.head_dims
    if not (isinstance(dims, tuple) and len(dims) == 2 and all(isinstance(d, int) and d >= 1 for d in dims)
            and dims[0] <= dims[1]):
        return where + f"head_dims={dims!r} is not an inclusive (low, high) range of ints >= 1"
    if isinstance(kernel.head_dim_multiple, bool) or not isinstance(kernel.head_dim_multiple, int) or \
            kernel.head_dim_multiple < 1:
        return where + f"head_dim_multiple={kernel.head_dim_multiple!r} is not an int >= 1"
    for flag in ("returns_lse", "supports_mask", "supports_causal", "supports_gqa", "exact"):
        if not isinstance(getattr(kernel, flag), bool):
            return where + f"{flag}={getattr(kernel, flag)!r} is not a bool"
    if not isinstance(kernel.cp_modes, (set, frozenset)) or not set(kernel.cp_modes) <= set(CP_MODES):
        return where + f"cp_modes={kernel.cp_modes!r} is not a subset of {sorted(CP_MODES)}"
    return ""


def _kernels_problem(answer: Any) -> str:
    if not isinstance(answer, (list, tuple)):
        return f"a {type(answer).__name__} ({answer!r:.60}); expected a list of cachedit.AttentionKernel"
    return next((p for p in map(_kernel_problem, answer) if p), "")


def _instance_problem(module: str, name: str) -> Callable[[Any], str]:
    def problem(answer: Any) -> str:
        cls = getattr(importlib.import_module(module), name)
        return "" if isinstance(answer, cls) else f"a {type(answer).__name__}; expected a {module}.{name}"
    return problem


def _compile_options_problem(answer: Any) -> str:
    import inspect

    import torch

    if not isinstance(answer, dict):
        return f"a {type(answer).__name__}; expected a dict of torch.compile keyword arguments"
    allowed = (set(inspect.signature(torch.compile).parameters) - {"model"}) | {"fuse_qkv"}
    unknown = sorted(map(str, set(answer) - allowed))
    if unknown:
        return f"unknown key(s) {unknown}; allowed: {sorted(allowed)}"
    kinds = {"fullgraph": (bool,), "dynamic": (bool, type(None)), "fuse_qkv": (bool,), "disable": (bool,),
             "mode": (str, type(None)), "options": (dict, type(None))}
    for key, types in kinds.items():
        if key in answer and not isinstance(answer[key], types):
            return f"{key}={answer[key]!r:.60} of type {type(answer[key]).__name__}"
    if "backend" in answer and not (isinstance(answer["backend"], str) or callable(answer["backend"])):
        return f"backend={answer['backend']!r:.60}; expected a torch.compile backend name or callable"
    return ""


ANSWER_PROBLEMS: dict[str, Callable[[Any], str]] = {
    "cachedit_register_backends": lambda a: f"a return value {a!r:.60}; declare backends with registry.add(...)",
    "cachedit_register_models": lambda a: f"a return value {a!r:.60}; register with registry.adapters.register(...)",
    "cachedit_attention_kernels": _kernels_problem,
    "cachedit_communicator": _instance_problem("cachedit.parallel.communicator", "Communicator"),
    "cachedit_quantized_linear": _instance_problem("cachedit.quant.spec", "QuantizedLinearPath"),
    "cachedit_compile_options": _compile_options_problem,
}


def answer_problem(hook: str, answer: Any) -> str:
    """Why `answer` is not a valid answer to `hook` ("" when it is; None, no answer, always is)."""
    return "" if answer is None else ANSWER_PROBLEMS.get(hook, lambda a: "")(answer)


def _guard(plugin: str, hook: str, function: Callable) -> Callable:
    """`function` (one hook implementation of `plugin`) with its faults and wrong answers raised as a `PluginFault`."""

    @functools.wraps(function)
    def guarded(*args, **kwargs):
        token = declaring_plugin.set(plugin)
        try:
            answer = function(*args, **kwargs)
        except (KeyboardInterrupt, PluginFault):
            raise
        except BaseException as exc:  # noqa: B036 - SystemExit and the like from a plugin are its faults
            raise PluginFault(plugin, hook, f"raised in {hook}: {_short_error(exc)}") from exc
        finally:
            declaring_plugin.reset(token)
        problem = answer_problem(hook, answer)
        if problem:
            raise PluginFault(plugin, hook, f"answered {hook} with {problem}")
        return answer

    return guarded


class _Guarded:
    """What pluggy registers for a plugin: its hook functions, each behind `_guard` (hook wrappers,
    which must stay generator functions, as they are)."""

    def __init__(self, plugin: Any, name: str, pm: pluggy.PluginManager) -> None:
        self._cachedit_name = name
        for attr in dir(plugin):
            opts = pm.parse_hookimpl_opts(plugin, attr)
            if opts is None:
                continue
            function = getattr(plugin, attr)
            if not (opts.get("wrapper") or opts.get("hookwrapper")):
                function = _guard(name, opts.get("specname") or attr, function)
                setattr(function, f"{hookspecs.PROJECT}_impl", dict(opts))
            setattr(self, attr, function)

    def __repr__(self) -> str:
        return f"<cachedit plugin {self._cachedit_name!r}>"


class PluginManager:
    """Typed access to every loaded plugin. Use `manager()` for the process-wide instance."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self.failed: dict[str, str] = {}  # plugin name -> error
        self.excluded: dict[str, str] = {}  # plugin name -> why it was not loaded
        self.backends: dict[str, Backend] = {}  # backend name -> the winning declaration
        self._registry = BackendRegistry()
        self.models = ModelRegistries()  # the process-wide model registries, as plugins see them
        from . import defaults

        self._pm.register(defaults, name=BUILTIN)  # the core's own: not guarded, a fault there is a bug
        self._pm.hook.cachedit_register_backends.call_historic(kwargs={"registry": self._registry})
        self._pm.hook.cachedit_register_models.call_historic(kwargs={"registry": self.models})

    # -- loading ---------------------------------------------------------------------------
    def load_entry_points(self, entry_points: Iterable[Any] | None = None) -> None:
        """Import and register every selected plugin, each asked for its backends as it registers."""
        if entry_points is None:  # every distribution's, as pluggy reads them: `entry_points()` hides same-name ones
            entry_points = [ep for dist in importlib.metadata.distributions() for ep in dist.entry_points
                            if ep.group == ENTRY_POINT_GROUP]
        by_name: dict[str, list] = {}
        for ep in entry_points:
            by_name.setdefault(ep.name, []).append(ep)
        allowed, blocked = _selection()
        for name in sorted(by_name):
            if name in blocked or (allowed is not None and name not in allowed):
                self.excluded[name] = f"not loaded: excluded by {ENV_SELECT}={os.environ.get(ENV_SELECT)!r}"
                continue
            targets = sorted({ep.value for ep in by_name[name]})
            if len(targets) > 1:
                self._fail(name, f"entry-point name {name!r} is claimed by several plugins ({', '.join(targets)}); "
                                 "none of them is loaded: rename one")
                continue
            try:
                plugin = by_name[name][0].load()
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: B036 - a plugin's sys.exit() at import is its fault
                self._fail(name, f"failed to load: {_short_error(exc)}", exc)
                continue
            self._register(plugin, name)
        self._select_backends(warn=True)

    def register(self, plugin: Any, name: str) -> None:
        """Register an in-process plugin object or module (what entry points resolve to); it is asked
        for its backends at once. Its faults are recorded in `failed`, like those of loaded plugins."""
        self._register(plugin, name)
        self._select_backends(warn=True)

    def unregister(self, name: str) -> None:
        """Remove plugin `name` with the backends it declared and the models it registered."""
        if name == BUILTIN or not self._pm.has_plugin(name):
            raise PluginError(f"no plugin named {name!r} is registered")
        self._pm.unregister(name=name)
        self._registry.forget(name)
        self.models.forget(name)
        self._select_backends(warn=False)

    def close(self) -> None:
        """Forget every plugin's models (this manager is being replaced)."""
        for name, _ in self._pm.list_name_plugin():
            if name != BUILTIN:
                self.models.forget(name)

    def _register(self, plugin: Any, name: str) -> None:
        if self._pm.has_plugin(name) or name == BUILTIN:
            raise PluginError(f"a plugin named {name!r} is already registered")
        self.failed.pop(name, None)
        try:
            self._pm.register(_Guarded(plugin, name, self._pm), name=name)  # replays cachedit_register_backends
        except PluginFault as fault:
            self._fail(name, fault.problem, fault.__cause__)
            return
        except pluggy.PluginValidationError as exc:
            self._fail(name, f"has an invalid hook implementation: {exc}", exc)
            return
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: B036 - e.g. an attribute of the plugin that raises when read
            self._fail(name, f"could not be registered: {_short_error(exc)}", exc)
            return
        self._check_pending()
        self._select_backends(warn=False)

    def _check_pending(self) -> None:
        """pluggy's check_pending, reported against the plugin: a misspelled hook is never silently ignored."""
        while True:
            try:
                self._pm.check_pending()
                return
            except pluggy.PluginValidationError as exc:
                name = self._pm.get_name(exc.plugin)
                unknown = sorted({c.name for c in self._pm.get_hookcallers(exc.plugin) or [] if not c.has_spec()})
                hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, SPEC_NAMES, 1))
                         else repr(u) for u in unknown]
                self._fail(name, f"implements unknown hook(s) {', '.join(hints)}; known hooks: {', '.join(SPEC_NAMES)} "
                                 "(mark a hook of a newer cachedit with hookimpl(optionalhook=True))", exc)

    def _fail(self, name: str, error: str, cause: BaseException | None = None) -> None:
        """Record plugin `name` as failed and drop it with every backend it declared."""
        if _strict():
            raise PluginError(f"cachedit plugin {name!r} {error}") from cause
        self.failed[name] = error
        if self._pm.has_plugin(name):
            self._pm.unregister(name=name)
        self._registry.forget(name)
        self.models.forget(name)
        self._select_backends(warn=False)
        warnings.warn(f"cachedit plugin {name!r} is ignored: {error}", stacklevel=3)

    def _select_backends(self, warn: bool) -> None:
        """The winning declaration per backend name: highest priority, then plugin name (not install order)."""
        declared = self._registry.declared
        self.backends = {}
        for name in sorted({b.name for b in declared}):
            claims = sorted((b for b in declared if b.name == name), key=lambda b: (-b.priority, b.plugin))
            self.backends[name] = claims[0]
            if len(claims) > 1 and warn:
                losers = ", ".join(f"{b.plugin!r} (priority {b.priority})" for b in claims[1:])
                warnings.warn(f"backend {name!r} is declared by several plugins; using {claims[0].plugin!r} "
                              f"(priority {claims[0].priority}) over {losers}", stacklevel=3)

    # -- asking plugins --------------------------------------------------------------------
    def _caller(self, hook: str, backend: Backend):
        """pluggy's caller for `hook`, without the plugins that declared backends other than `backend`."""
        others = {b.plugin for b in self._registry.declared} - {backend.plugin}
        return self._pm.subset_hook_caller(hook, remove_plugins=[self._pm.get_plugin(p) for p in sorted(others)
                                                                 if self._pm.has_plugin(p)])

    def _ask(self, hook: str, backend: Backend, **kwargs: Any) -> Any:
        """`hook`'s answer for `backend`; a faulty extension is dropped and the question asked again."""
        while True:
            if not isinstance(backend, Backend) or self.backends.get(backend.name) != backend:
                why = self.failed.get(getattr(backend, "plugin", None), "it is not an installed backend")
                raise PluginError(f"backend {getattr(backend, 'name', backend)!r} cannot be asked about: {why}")
            try:
                answer = self._caller(hook, backend)(backend=backend, **kwargs)
            except PluginFault as fault:
                self._fail(fault.plugin, fault.problem, fault.__cause__)
                if fault.plugin == backend.plugin:
                    raise PluginError(f"backend {backend.name!r} is unusable: plugin {fault.plugin!r} "
                                      f"{fault.problem}") from fault
                continue
            spec = getattr(self._pm.hook, hook).spec
            answers = [answer] if spec.opts.get("firstresult") else answer
            problem = next((p for p in (answer_problem(hook, a) for a in answers) if p), "")
            if problem:  # every implementation's own answer was checked: a hook wrapper changed it
                raise PluginError(f"{hook} for backend {backend.name!r}: a hook wrapper answered with {problem}")
            return answer

    def attention_kernels(self, backend: Backend) -> list[AttentionKernel]:
        """Every `AttentionKernel` offered for `backend`: its plugin's, the extensions' and the default's, pooled."""
        return [k for answer in self._ask("cachedit_attention_kernels", backend) for k in answer]

    def communicator(self, backend: Backend, group=None) -> Communicator:
        """The first answer for `group` (the core's torch.distributed one at worst)."""
        return self._ask("cachedit_communicator", backend, group=group)

    def quantized_linear(self, backend: Backend, spec: QuantSpec) -> QuantizedLinearPath | None:
        """The first `QuantizedLinearPath` for `spec`, or None when no plugin serves it."""
        return self._ask("cachedit_quantized_linear", backend, spec=spec)

    def compile_options(self, backend: Backend, target: CompileTarget) -> dict[str, Any]:
        """Plugins' answers merged (trylast defaults first, later answers override), the user's config last."""
        merged: dict[str, Any] = {}
        for answer in reversed(self._ask("cachedit_compile_options", backend, target=target)):
            merged.update(answer)
        cfg = target.config
        user = {"mode": cfg.mode, "backend": cfg.backend, "options": dict(cfg.options) or None, "fuse_qkv": cfg.fuse_qkv}
        merged.update({k: v for k, v in user.items() if v is not None})
        if merged.get("mode") is not None:
            merged.pop("options", None)
        return merged

    # -- reporting and selection -------------------------------------------------------------
    def records(self) -> list[PluginRecord]:
        """One record per declared backend, plus one per plugin that failed or was excluded."""
        rows = []
        for b in sorted(self.backends.values(), key=lambda b: (-b.priority, b.name)):
            ok, reason = b.probe()
            rows.append(PluginRecord(b.name, b.plugin, ok, reason, "", b.device_type, b.dist_backend, b.priority))
        for name, error in sorted(self.failed.items()):
            rows.append(PluginRecord(name, name, False, "plugin failed to load", error))
        for name, why in sorted(self.excluded.items()):
            rows.append(PluginRecord(name, name, False, why))
        return rows

    def resolve(self, device: str) -> Backend:
        """The backend for `device` (a backend name or "auto"); ValueError with the reason otherwise."""
        if not isinstance(device, str):
            raise ValueError(f"device must be a backend name or 'auto', got {device!r}")
        if device == "auto":
            for b in sorted(self.backends.values(), key=lambda b: (-b.priority, b.name)):
                if b.probe()[0]:
                    return b
            raise ValueError(f"device='auto': no installed backend is available ({self._describe()})")
        if device not in self.backends:
            extra = f"; failed plugins: {'; '.join(f'{n}: {e}' for n, e in self.failed.items())}" if self.failed else ""
            raise ValueError(
                f"device={device!r} is not an installed backend; allowed values: 'auto', "
                f"{', '.join(repr(n) for n in sorted(self.backends))}{extra}"
            )
        ok, reason = self.backends[device].probe()
        if not ok:
            raise ValueError(f"device={device!r} is installed but unavailable: {reason}")
        return self.backends[device]

    def _describe(self) -> str:
        return "; ".join(f"{r.name}: {r.reason or r.error}" for r in self.records()) or "none installed"


_MANAGER: PluginManager | None = None
_BUILDING = False  # manager() is loading plugins: a model lookup meanwhile must not start another load


def manager() -> PluginManager:
    """The process-wide plugin manager, loaded on first use."""
    global _MANAGER, _BUILDING
    if _MANAGER is None:
        _BUILDING = True
        try:
            pm = PluginManager()
            pm.load_entry_points()
        finally:
            _BUILDING = False
        _MANAGER = pm
    return _MANAGER


def reload() -> PluginManager:
    """Forget loaded plugins and load again (after installing one, or changing CACHEDIT_PLUGINS)."""
    global _MANAGER
    old, _MANAGER = _MANAGER, None
    if old is not None:
        old.close()
    return manager()


def _load_plugin_models() -> None:
    """Before a model lookup: the plugins are loaded, so the models they ship are registered."""
    if _MANAGER is None and not _BUILDING:
        manager()


model_lookup.install(_load_plugin_models)
