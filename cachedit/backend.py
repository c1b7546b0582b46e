"""What a backend plugin declares: a named device family with a cheap availability probe.

A `Backend` is pure data, checked when it is built, so a plugin declaring a malformed one fails
in its own `cachedit_register_backends` and is reported by name. Everything a backend supplies
beyond its identity (communicators, attention kernels, quantized linears, compile options) is
asked for through the plugin hooks, so a backend can be listed and reported without
initialising any device.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from .registry import current_owner

# The plugin whose hook implementation is running; set by the plugin manager's guard, read by
# `BackendRegistry.add` (and every `Registry.register`) to record who declared what.
declaring_plugin = current_owner


def _always_available() -> tuple[bool, str]:
    return True, ""


def _identifier(value) -> bool:
    return isinstance(value, str) and bool(value) and value.replace("_", "").replace("-", "").isalnum()


def _dist_backend(value) -> bool:
    """torch.distributed takes a backend name, or "device:backend" pairs joined by commas."""
    if not isinstance(value, str):
        return False
    parts = [p.split(":") for p in value.split(",")]
    return all(len(p) <= 2 and all(_identifier(x) for x in p) for p in parts)


@dataclass(frozen=True)
class Backend:
    """One backend as declared through `cachedit_register_backends`.

    name:           what users pass as `device=` (e.g. "cpu_ref", "cuda", "ascend").
    device_type:    the torch device type tensors live on ("cpu", "cuda", "npu").
    dist_backend:   the torch.distributed backend name its process groups use ("gloo", "nccl", "hccl").
    priority:       an int; higher wins for `device="auto"` and when two plugins claim the same name.
    is_available:   cheap probe returning (available, reason-if-not); must not initialise a device.
    description:    one line for `cachedit backends`.
    plugin:         filled in by the plugin manager: the entry-point name that declared it.
    """

    name: str
    device_type: str
    dist_backend: str
    priority: int = 0
    is_available: Callable[[], tuple[bool, str]] = field(default=_always_available, compare=False, repr=False)
    description: str = ""
    plugin: str = ""

    def __post_init__(self) -> None:
        for name in ("name", "device_type"):
            if not _identifier(getattr(self, name)):
                error = ValueError if isinstance(getattr(self, name), str) else TypeError
                raise error(f"Backend.{name}={getattr(self, name)!r} is invalid; allowed values: a non-empty "
                                "identifier string (letters, digits, '_', '-')")
        if not _dist_backend(self.dist_backend):
            raise ValueError(f"Backend.dist_backend={self.dist_backend!r} is invalid; allowed values: a "
                             "torch.distributed backend name ('gloo', 'nccl', ...) or a device mapping such as "
                             "'cpu:gloo,cuda:nccl'")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise TypeError(f"Backend.priority={self.priority!r} is invalid; allowed values: an int")
        if not callable(self.is_available):
            raise TypeError(f"Backend.is_available={self.is_available!r} is invalid; allowed values: a callable "
                            "returning (bool, str)")
        for name in ("description", "plugin"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"Backend.{name}={getattr(self, name)!r} is invalid; allowed values: a string")

    def probe(self) -> tuple[bool, str]:
        """Run `is_available` defensively: a probe that raises (anything but KeyboardInterrupt, `sys.exit()`
        included) or answers something other than (bool, str) means unavailable, with that as the reason."""
        try:
            answer = self.is_available()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a broken probe must never break listing or selection
            return False, f"availability probe raised {type(exc).__name__}: {exc}"
        if not (isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[0], bool)
                and isinstance(answer[1], str)):
            return False, f"availability probe answered {answer!r:.80}; expected (bool, str)"
        ok, reason = answer
        return ok, "" if ok else (reason or "unavailable (no reason given)")


@dataclass(frozen=True)
class PluginRecord:
    """One row of `cachedit.backends()`: a declared backend, or a plugin that failed to load."""

    name: str
    plugin: str
    available: bool
    reason: str = ""
    error: str = ""
    device_type: str = ""
    dist_backend: str = ""
    priority: int = 0


class BackendRegistry:
    """Collects the backends plugins declare; handed to `cachedit_register_backends`."""

    def __init__(self) -> None:
        self.declared: list[Backend] = []

    def add(self, backend: Backend) -> None:
        """Declare `backend` for the plugin whose `cachedit_register_backends` is running."""
        if not isinstance(backend, Backend):
            raise TypeError(f"registry.add expects a cachedit.Backend, got {type(backend).__name__}")
        plugin = declaring_plugin.get()
        if plugin is None:
            raise RuntimeError("registry.add was called outside a cachedit_register_backends implementation")
        self.declared.append(replace(backend, plugin=plugin))

    def forget(self, plugin: str) -> None:
        """Drop every declaration of `plugin` (it failed)."""
        self.declared = [b for b in self.declared if b.plugin != plugin]
