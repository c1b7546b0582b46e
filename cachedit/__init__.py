"""cachedit: make diffusers DiT pipelines faster on any accelerator, through backend plugins.

    pipe = cachedit.accelerate(pipe, device="auto", compile=True)
    cachedit.summary(pipe)
    cachedit.disable(pipe)   # bit-for-bit back to the original

The public names load on first use (PEP 562): `import cachedit` alone imports neither diffusers nor what
diffusers imports, so a backend plugin's `from cachedit import hookimpl` stays light and the command line
can quiet other libraries before they load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import plugins as _plugins  # noqa: F401 - light (no plugin loads); lets model lookups see plugins' models

__version__ = "0.1.0"

_PUBLIC = {
    "accelerate": ".api", "disable": ".api", "refresh": ".api", "request": ".api", "summary": ".api",
    "is_accelerated": ".api", "applied": ".api",
    "AttentionKernel": ".attention", "Backend": ".backend", "PluginRecord": ".backend",
    "CacheConfig": ".config", "CompileConfig": ".config", "ParallelConfig": ".config", "QuantConfig": ".config",
    "hookimpl": ".hookspecs",
}

if TYPE_CHECKING:
    from .api import accelerate, applied, disable, is_accelerated, refresh, request, summary  # noqa: F401
    from .attention import AttentionKernel  # noqa: F401
    from .backend import Backend, PluginRecord
    from .config import CacheConfig, CompileConfig, ParallelConfig, QuantConfig  # noqa: F401
    from .hookspecs import hookimpl  # noqa: F401


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cachedit' has no attribute {name!r}")


def backends() -> list["PluginRecord"]:
    """One record per installed backend (and per plugin that failed to load): name, available, reason, error."""
    from .plugins import manager

    return manager().records()


__all__ = ["accelerate", "disable", "refresh", "request", "summary", "is_accelerated", "applied", "backends",
           "hookimpl", "Backend",
           "PluginRecord", "AttentionKernel", "CacheConfig", "CompileConfig", "ParallelConfig", "QuantConfig"]
