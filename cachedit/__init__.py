"""cachedit: make diffusers DiT pipelines faster on any accelerator, through backend plugins.

    pipe = cachedit.accelerate(pipe, device="auto", compile=True)
    cachedit.summary(pipe)
    cachedit.disable(pipe)   # bit-for-bit back to the original
"""

from __future__ import annotations

from .api import accelerate, disable, refresh, request, summary
from .attention import AttentionKernel
from .backend import Backend, PluginRecord
from .config import CacheConfig, CompileConfig, ParallelConfig, QuantConfig
from .hookspecs import hookimpl

__version__ = "0.1.0"


def backends() -> list[PluginRecord]:
    """One record per installed backend (and per plugin that failed to load): name, available, reason, error."""
    from .plugins import manager

    return manager().records()


__all__ = [
    "accelerate", "disable", "refresh", "request", "summary", "backends", "hookimpl", "Backend", "PluginRecord", "AttentionKernel",
    "CacheConfig", "CompileConfig", "ParallelConfig", "QuantConfig",
]
