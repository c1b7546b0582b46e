"""What a plugin's `cachedit_register_models` receives: the four registries that make up a model's support.

    @cachedit.hookimpl
    def cachedit_register_models(registry):
        registry.adapters.register("MyTransformer", Adapter("mine", ("blocks",)))
        registry.cp_plans.register("MyTransformer", diffusers_plan())

Each registry's module is imported on first use, so a plugin that ships no model makes nobody import
diffusers. Registrations are recorded against the plugin (see cachedit.registry) and forgotten with it.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .adapters import Adapter, BlockIO
    from .parallel.plans import CPPlanBuilder
    from .parallel.tp_plans import TPPlanBuilder
    from .registry import Registry

_MODULES = {"adapters": "cachedit.adapters", "block_io": "cachedit.adapters",
            "cp_plans": "cachedit.parallel.plans", "tp_plans": "cachedit.parallel.tp_plans"}


class ModelRegistries:
    """adapters (transformer class name -> Adapter), block_io (block class name -> BlockIO),
    cp_plans / tp_plans (module class name -> a function building its plan from the module)."""

    @property
    def adapters(self) -> Registry[Adapter]:
        from .adapters import ADAPTERS

        return ADAPTERS

    @property
    def block_io(self) -> Registry[BlockIO]:
        from .adapters import BLOCK_IO

        return BLOCK_IO

    @property
    def cp_plans(self) -> Registry[CPPlanBuilder]:
        from .parallel.plans import CP_PLANS

        return CP_PLANS

    @property
    def tp_plans(self) -> Registry[TPPlanBuilder]:
        from .parallel.tp_plans import TP_PLANS

        return TP_PLANS

    def forget(self, owner: str) -> None:
        """Drop `owner`'s registrations (a registry whose module was never imported holds none)."""
        for attr, module in _MODULES.items():
            if module in sys.modules:
                getattr(self, attr).forget(owner)
