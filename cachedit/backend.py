"""What a backend plugin declares: a named device family with a cheap availability probe.

A `Backend` is pure data. Everything a backend supplies beyond its identity (communicators,
attention kernels, quantized linears, compile options) is asked for through the plugin hooks,
so a backend can be listed and reported without initialising any device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


def _always_available() -> tuple[bool, str]:
    return True, ""


@dataclass(frozen=True)
class Backend:
    """One backend as declared through `cachedit_register_backends`.

    name:           what users pass as `device=` (e.g. "cpu_ref", "cuda", "ascend").
    device_type:    the torch device type tensors live on ("cpu", "cuda", "npu").
    dist_backend:   the torch.distributed backend name its process groups use ("gloo", "nccl", "hccl").
    priority:       higher wins for `device="auto"` and when two plugins claim the same name.
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

    def probe(self) -> tuple[bool, str]:
        """Run `is_available` defensively: a probe that raises means unavailable, with the error as reason."""
        try:
            ok, reason = self.is_available()
        except Exception as exc:  # a broken probe must never break listing or selection
            return False, f"availability probe raised {type(exc).__name__}: {exc}"
        return bool(ok), "" if ok else (reason or "unavailable (no reason given)")


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
        self._current_plugin = ""

    def add(self, backend: Backend) -> None:
        if not isinstance(backend, Backend):
            raise TypeError(f"registry.add expects a cachedit.backend.Backend, got {type(backend).__name__}")
        if not backend.name or not backend.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"backend name must be a non-empty identifier, got {backend.name!r}")
        from dataclasses import replace

        self.declared.append(replace(backend, plugin=self._current_plugin))
