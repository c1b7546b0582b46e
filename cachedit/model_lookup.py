"""The moment before a model registry (adapters, block IO, CP / TP plans) is read.

Plugins may ship model support (`cachedit_register_models`), so the plugins must be loaded before a
lookup answers "unknown model". The registries' modules cannot import cachedit.plugins (it imports
them), so cachedit.plugins installs its loader here, and the registries call `before_lookup`.
"""

from __future__ import annotations

from typing import Callable

_loader: Callable[[], None] | None = None


def install(loader: Callable[[], None] | None) -> None:
    """Run `loader` before every model lookup (None: nothing runs)."""
    global _loader
    _loader = loader


def before_lookup() -> None:
    if _loader is not None:
        _loader()
