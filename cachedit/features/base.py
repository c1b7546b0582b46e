"""What every feature is and what they share: the `Feature` protocol, its `Applied` record, the `Context`.

A feature is one small object with explicit state, in the spirit of diffusers' hook classes:
- `check(ctx)` is pure and raises ValueError naming the field; every feature's check runs before any
  feature changes anything;
- `wanted(ctx)` says whether this call asks for it (asked just before it would apply, so it sees what
  the features before it did);
- `apply(ctx) -> Applied` changes the pipeline and returns the record that undoes exactly that;
- `idle(ctx)` is its part of `cachedit.summary` when it was not applied.

Features never write each other's attributes. What they share goes through the `Context`: the
backend's services (kernels, communicators, quantized linears, compile options), the device mesh,
one attention router per transformer, one reducer chain per transformer (the cache reads its decision
statistic through it; parallel plans add their stages), and read access to the records of the
features applied before (`ctx.part`).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from .. import lifecycle
from ..adapters import Adapter
from ..attention import AttentionRouter
from ..backend import Backend
from ..config import CacheConfig, CompileConfig, ParallelConfig, QuantConfig


@dataclass
class Applied:
    """What one feature changed: `parts` by component name, the undo steps, the stats it reports."""

    name: str
    parts: dict[str, Any] = field(default_factory=dict)
    report: Callable[[], dict] = dict  # -> this feature's summary sections
    undo: list[Callable[[], None]] = field(default_factory=list)  # run last-first by remove()
    prechecks: list[Callable[[], None]] = field(default_factory=list)  # run by disable before any removal

    def stats(self) -> dict:
        return self.report()

    def check_removable(self) -> None:
        for check in self.prechecks:
            check()

    def remove(self) -> None:
        while self.undo:
            self.undo.pop()()

    @contextmanager
    def building(self):
        """`with record.building():` a failure half-way removes what was applied so far, then re-raises."""
        try:
            yield self
        except BaseException:
            self.remove()
            raise


class Feature:
    """The protocol (and its defaults): see the module docstring."""

    name = "feature"

    def check(self, ctx: "Context") -> None:
        pass

    def wanted(self, ctx: "Context") -> bool:
        return False

    def apply(self, ctx: "Context") -> Applied:
        raise NotImplementedError

    def idle(self, ctx: "Context") -> dict:
        return {}


class ReducerChain:
    """How one transformer's cache decision statistic is agreed across ranks: stages run in the order
    they were added (context parallel: the mean over its group; CFG parallel: then over the two halves
    of a batched call). Empty: one process decides alone, the statistic unchanged."""

    def __init__(self) -> None:
        self.stages: list[Callable[[torch.Tensor], torch.Tensor]] = []

    def add(self, stage: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.stages.append(stage)

    def remove(self, stage) -> None:
        if stage in self.stages:
            self.stages.remove(stage)

    def __call__(self, stats: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            stats = stage(stats)
        return stats


@dataclass
class Context:
    """One `accelerate` call's inputs and shared services; kept on the pipeline until `disable`."""

    pipe: Any
    backend: Backend
    plugins: Any  # the plugin manager (plugins.PluginManager)
    cache: CacheConfig | None
    parallel: ParallelConfig | None
    quantize: QuantConfig | None
    compile: CompileConfig | None
    attention: str | None
    adapters: dict[str, Adapter]
    inference_mode: bool = True  # pipeline calls under torch.inference_mode (inference.py)
    records: list[Applied] = field(default_factory=list)  # in the order applied
    routers: dict[str, AttentionRouter] = field(default_factory=dict)
    reducers: dict[str, ReducerChain] = field(default_factory=dict)
    num_steps_override: int | None = None  # refresh / request: this call's step count
    scope: lifecycle.Scope | None = None

    def __post_init__(self) -> None:
        self.scope = lifecycle.Scope(lambda: list(self.transformers().values()))

    def transformers(self) -> dict[str, nn.Module]:
        """The accelerated transformers by component name, looked up now (components can be replaced)."""
        return {name: getattr(self.pipe, name) for name in self.adapters}

    # -- backend services ----------------------------------------------------------------------
    @functools.cached_property
    def kernels(self) -> list:
        return self.plugins.attention_kernels(self.backend)

    def communicator(self, group=None):
        """The backend's communicator over `group` (None: the world)."""
        return self.plugins.communicator(self.backend, group)

    @functools.cached_property
    def mesh(self):
        """The hybrid (cfg, ring, ulysses, tensor) device mesh, or None (one dimension is the world)."""
        from ..parallel.mesh import hybrid_mesh

        return hybrid_mesh(self.parallel, self.backend.device_type) if self.parallel is not None else None

    def group(self, dim: str):
        """This rank's process group along mesh dimension `dim` (None: the world)."""
        return self.mesh.get_group(dim) if self.mesh is not None else None

    # -- shared between features ---------------------------------------------------------------
    def router(self, name: str) -> AttentionRouter:
        """The attention router of transformer `name` (one per transformer, made on first use)."""
        if name not in self.routers:
            self.routers[name] = AttentionRouter(self.kernels, self.attention)
        return self.routers[name]

    def reducer(self, name: str) -> ReducerChain:
        if name not in self.reducers:
            self.reducers[name] = ReducerChain()
        return self.reducers[name]

    def record(self, feature: str) -> Applied | None:
        return next((r for r in self.records if r.name == feature), None)

    def part(self, feature: str, name: str):
        """What `feature` (applied before the asker) put on component `name`, or None."""
        record = self.record(feature)
        return record.parts.get(name) if record is not None else None

    def num_steps(self) -> int | None:
        """This call's step count: a `refresh` / `request` override, else the scheduler's."""
        if self.num_steps_override is not None:
            return self.num_steps_override
        timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        return len(timesteps) if timesteps is not None else None


def first_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first parameter (float32 for a module without any)."""
    param = next(module.parameters(), None)
    return param.dtype if param is not None else torch.float32
