"""The one facade over pluggy: load plugins in isolation, select them, and ask them things.

Plugins come from the entry-point group `cachedit.plugins`. A plugin that fails to import,
register or declare its backends is recorded with its error instead of breaking
`import cachedit` (set CACHEDIT_STRICT_PLUGINS=1 to make that fatal). CACHEDIT_PLUGINS
selects plugins by entry-point name: "cpu_ref,cuda" loads only those, "-ascend" loads all
but that one.
"""

from __future__ import annotations

import importlib.metadata
import os
import traceback
import warnings
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .backend import Backend, BackendRegistry, PluginRecord

ENTRY_POINT_GROUP = "cachedit.plugins"
ENV_SELECT = "CACHEDIT_PLUGINS"
ENV_STRICT = "CACHEDIT_STRICT_PLUGINS"
BUILTIN = "builtin"


class PluginError(RuntimeError):
    """A plugin failed while strict mode was on, or a hook implementation raised."""


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


class PluginManager:
    """Typed access to every loaded plugin. Use `manager()` for the process-wide instance."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self.failed: dict[str, str] = {}  # plugin name -> error
        self.excluded: dict[str, str] = {}  # plugin name -> why it was not loaded
        self.backends: dict[str, Backend] = {}
        from . import defaults

        self._pm.register(defaults, name=BUILTIN)

    # -- loading ---------------------------------------------------------------------------
    def load_entry_points(self, entry_points: Iterable[Any] | None = None) -> None:
        """Import and register every selected plugin, then collect the backends they declare."""
        if entry_points is None:
            entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        allowed, blocked = _selection()
        seen: set[str] = set()
        for ep in sorted(entry_points, key=lambda e: e.name):
            if ep.name in seen:
                continue
            seen.add(ep.name)
            if ep.name in blocked or (allowed is not None and ep.name not in allowed):
                self.excluded[ep.name] = f"not loaded: excluded by {ENV_SELECT}={os.environ.get(ENV_SELECT)!r}"
                continue
            try:
                self.register(ep.load(), ep.name)
            except Exception as exc:
                self._fail(ep.name, exc, "failed to load")
        self.collect_backends()

    def register(self, plugin: Any, name: str) -> None:
        """Register an in-process plugin object or module (what entry points resolve to)."""
        if self._pm.has_plugin(name):
            raise PluginError(f"a plugin named {name!r} is already registered")
        self._pm.register(plugin, name=name)

    def _fail(self, name: str, exc: BaseException, what: str) -> None:
        if _strict():
            raise PluginError(f"cachedit plugin {name!r} {what}: {_short_error(exc)}") from exc
        self.failed[name] = _short_error(exc)
        if self._pm.has_plugin(name):
            self._pm.unregister(name=name)
        warnings.warn(f"cachedit plugin {name!r} {what} and is ignored: {self.failed[name]}", stacklevel=3)

    def collect_backends(self) -> None:
        """Ask each plugin for its backends, one plugin at a time so one failure stays local."""
        declared: list[Backend] = []
        for plugin_name, impl in self._impls("cachedit_register_backends"):
            registry = BackendRegistry()
            registry._current_plugin = plugin_name
            try:
                impl.function(*({"registry": registry}[a] for a in impl.argnames))
            except Exception as exc:
                self._fail(plugin_name, exc, "raised in cachedit_register_backends")
                continue
            declared.extend(registry.declared)
        self.backends = {}
        for name in sorted({b.name for b in declared}):
            claims = sorted((b for b in declared if b.name == name), key=lambda b: (-b.priority, b.plugin))
            self.backends[name] = claims[0]
            if len(claims) > 1:
                losers = ", ".join(f"{b.plugin!r} (priority {b.priority})" for b in claims[1:])
                warnings.warn(
                    f"backend {name!r} is declared by several plugins; using {claims[0].plugin!r} "
                    f"(priority {claims[0].priority}) over {losers}",
                    stacklevel=2,
                )

    # -- asking plugins --------------------------------------------------------------------
    def _impls(self, hook_name: str):
        """(plugin name, HookImpl) in pluggy's call order: tryfirst first, trylast last."""
        caller = getattr(self._pm.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):
            if not (impl.hookwrapper or impl.wrapper) and impl.plugin_name not in self.failed:
                yield impl.plugin_name, impl

    def call_each(self, hook_name: str, firstresult: bool = False, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call each plugin's implementation with the arguments it asks for.

        Returns (plugin name, answer) for every non-None answer. An implementation that raises
        is a `PluginError` naming the plugin: a half-answered question is never silently used.
        """
        answers = []
        for plugin_name, impl in self._impls(hook_name):
            try:
                result = impl.function(*(kwargs[a] for a in impl.argnames))
            except Exception as exc:
                raise PluginError(f"plugin {plugin_name!r} raised in {hook_name}: {_short_error(exc)}") from exc
            if result is not None:
                answers.append((plugin_name, result))
                if firstresult:
                    break
        return answers

    def attention_kernels(self, backend: Backend) -> list:
        """Every `AttentionKernel` any plugin offers for `backend`, pooled."""
        return [k for _plugin, answer in self.call_each("cachedit_attention_kernels", backend=backend) for k in answer]

    def communicator(self, backend: Backend, group=None):
        """The first plugin's communicator for `group` (the core's torch.distributed one at worst)."""
        return self.call_each("cachedit_communicator", firstresult=True, backend=backend, group=group)[0][1]

    def quantized_linear(self, backend: Backend, spec):
        """The first plugin's `QuantizedLinearPath` for `spec`, or None when no plugin serves it."""
        answers = self.call_each("cachedit_quantized_linear", firstresult=True, backend=backend, spec=spec)
        return answers[0][1] if answers else None

    def compile_options(self, backend: Backend, target) -> dict[str, Any]:
        """Plugins' answers merged (trylast defaults first, later answers override), the user's config last."""
        merged: dict[str, Any] = {}
        for _plugin, answer in reversed(self.call_each("cachedit_compile_options", backend=backend, target=target)):
            merged.update(answer)
        cfg = target.config
        user = {"mode": cfg.mode, "backend": cfg.backend, "options": dict(cfg.options) or None, "fuse_qkv": cfg.fuse_qkv}
        merged.update({k: v for k, v in user.items() if v is not None})
        if merged.get("mode") is not None:
            merged.pop("options", None)
        return merged

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
            extra = f"; failed plugins: {', '.join(self.failed)}" if self.failed else ""
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


def manager() -> PluginManager:
    """The process-wide plugin manager, loaded on first use."""
    global _MANAGER
    if _MANAGER is None:
        pm = PluginManager()
        pm.load_entry_points()
        _MANAGER = pm
    return _MANAGER


def reload() -> PluginManager:
    """Forget loaded plugins and load again (after installing one, or changing CACHEDIT_PLUGINS)."""
    global _MANAGER
    _MANAGER = None
    return manager()
