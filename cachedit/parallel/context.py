"""Context parallelism: split each transformer call's sequence across ranks (Ulysses, Ring, USP).

`apply_context_parallel` puts instance-scoped hooks on a transformer from its plan (`plans.py`):
inputs are split at the entry, outputs gathered at the exit (`sharding.py`), and the attention
router's `wrapper` runs every self/joint attention over the whole sequence:

- Ulysses (`ParallelConfig.ulysses`): all-to-all from sequence- to head-sharded, attend, back.
- Ring (`ParallelConfig.ring`): K/V blocks rotate around the ring, merged by log-sum-exp.
- USP (both > 1): a 2-D mesh (ring, ulysses); Ulysses inside each row, Ring across rows.

Every rank runs the whole pipeline with the same inputs; each transformer call does 1/world of the
token work and every rank ends with the same output. Cache decisions are agreed across ranks
(`ContextParallel.reduce`, a stage of the cache's reducer chain, averages the statistic).
Collectives go through the backend's communicators, metered (`stats()`), so exchanged bytes can be
checked against the formula.

With tensor or CFG parallelism as well (`ParallelConfig.tensor` / `cfg`), the world is a (cfg,
ring, ulysses, tensor) mesh (`mesh.hybrid_mesh`): the sequence is split over the ranks of one
CFG half holding the same heads, and Ulysses trades those local heads.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .. import hooks
from ..attention import select_kernel
from ..config import ParallelConfig
from ..modelinfo import head_dim, num_heads
from .async_ulysses import install_async_ulysses
from .mesh import check_world, hybrid_mesh
from .metering import MeteredCommunicator
from .plans import CPPlan, ContextParallelOutput, cp_plan_for, resolve, supported_classes
from .ring import ring_attention
from .sharding import SequenceGatherHook, LocalAttentionHook, ScopeHook, SequenceState, SequenceSplitHook
from .ulysses import key_mask, ulysses_attention

HOOK_PREFIX = "cachedit.cp"


def cp_mode(config: ParallelConfig) -> str | None:
    """The context-parallel mode: "ulysses", "ring", "usp", or None when the sequence is not split."""
    if config.ulysses > 1 and config.ring > 1:
        return "usp"
    if config.ulysses > 1:
        return "ulysses"
    if config.ring > 1:
        return "ring"
    return None


def check_context_parallel(transformers: dict[str, nn.Module], config: ParallelConfig, kernels: list,
                           attention: str | None) -> None:
    """Every check that can fail before a context-parallel plan is applied (ValueError)."""
    mode = cp_mode(config)
    if mode is None:
        return
    check_world(config)
    for name, t in transformers.items():
        if cp_plan_for(t) is None:
            raise ValueError(f"parallel: no context-parallel plan for pipe.{name} ({type(t).__name__}); "
                             f"supported: {', '.join(supported_classes())} (add one with "
                             f"cachedit.parallel.plans.CP_PLANS.register)")
        heads = num_heads(t)
        if heads is not None and heads // config.tensor < config.ulysses:  # Ulysses splits a rank's heads
            raise ValueError(f"ParallelConfig.ulysses={config.ulysses} exceeds the {heads} attention heads of "
                             f"pipe.{name}; allowed: ulysses <= {heads} (use ring for the rest)")
        param = next(t.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        need_lse = config.ring > 1
        try:
            select_kernel(kernels, attention, dtype, head_dim(t) or 64, need_lse=need_lse, cp_mode=mode)
        except ValueError as exc:
            need = "a kernel that returns the log-sum-exp (returns_lse) and serves" if need_lse else "a kernel serving"
            raise ValueError(f"parallel: {mode} attention needs {need} cp_mode={mode!r}: {exc}") from None


def _communicators(config: ParallelConfig, communicator, mesh=None, device_type: str = "cpu"):
    """(world, ulysses, ring) communicators, metered; `communicator(group)` makes one over a process group
    (None: the world). With a hybrid mesh (`mesh.hybrid_mesh`: cfg, ring, ulysses, tensor; USP always has
    one) "world" is this rank's context-parallel group: the ranks of its CFG half holding the same heads."""
    if mesh is None and config.ring > 1 and config.ulysses > 1:
        mesh = hybrid_mesh(config, device_type)
    if mesh is not None:
        ulysses, ring = (MeteredCommunicator(communicator(mesh.get_group(d))) if getattr(config, d) > 1
                         else None for d in ("ulysses", "ring"))
        if ulysses is not None and ring is not None:
            world = MeteredCommunicator(communicator(mesh["ring", "ulysses"]._flatten().get_group()))
        else:
            world = ulysses or ring
        return world, ulysses, ring
    world = MeteredCommunicator(communicator(None))  # one dimension: it is the whole group
    return world, world if config.ulysses > 1 else None, world if config.ring > 1 else None


@dataclass
class ContextParallel:
    """One transformer's context-parallel plan as applied: its hooks, communicators and state."""

    config: ParallelConfig
    mode: str
    plan: CPPlan
    state: SequenceState
    world: MeteredCommunicator
    ulysses: MeteredCommunicator | None
    ring: MeteredCommunicator | None
    attached: list = field(default_factory=list)  # (module, hook name)
    router: object = None

    # -- attention ---------------------------------------------------------------------------
    def attend(self, router, query, key, value, attn_mask=None, is_causal=False, scale=None):
        """The router's wrapper: every SDPA call inside the transformer comes here."""
        if self.state.local_depth:
            kernel = router.kernel_for(query, key, attn_mask, is_causal)
            return kernel.fn(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
        if is_causal:
            raise ValueError("context parallelism does not support causal attention (the sequence is split and "
                             "reordered across ranks); DiT attention is not causal")
        mask = key_mask(attn_mask, key)
        uneven = self.state.uneven
        if self.mode == "ulysses":
            kernel = router.kernel_for(query, key, mask, False, cp_mode="ulysses")

            def inner(q, k, v, m):
                return kernel.fn(q, k, v, attn_mask=m, is_causal=False, scale=scale)
        else:
            kernel = router.kernel_for(query, key, mask, False, need_lse=True, cp_mode=self.mode)

            def inner(q, k, v, m):
                return ring_attention(self.ring, q, k, v, m, scale, kernel, uneven=uneven)

            if self.mode == "ring":
                return inner(query, key, value, mask)
        return ulysses_attention(self.ulysses, query, key, value, mask, inner, uneven=uneven,
                                 fp8=self.config.fp8_comm, async_op=self.config.async_ulysses)

    def reduce(self, stats: torch.Tensor) -> torch.Tensor:
        """A stage of the cache's reducer chain: the statistic averaged over every rank, so all decide alike."""
        return self.world.all_reduce(stats, "avg")

    def stats(self) -> dict:
        """Bytes this rank sent and calls made, per mesh dimension and collective."""
        comms = {"world": self.world, "ulysses": self.ulysses, "ring": self.ring}
        seen, out = set(), {}
        for name, comm in comms.items():
            if comm is None or id(comm) in seen:
                continue
            seen.add(id(comm))
            out[name] = {"bytes": dict(comm.sent), "calls": dict(comm.calls)}
        return out

    def reset_stats(self) -> None:
        for comm in {id(c): c for c in (self.world, self.ulysses, self.ring) if c is not None}.values():
            comm.reset()


def apply_context_parallel(transformer: nn.Module, config: ParallelConfig, communicator, router, mesh=None,
                           device_type: str = "cpu") -> ContextParallel:
    """Hook `transformer` for context parallelism; `communicator(group)` makes a communicator over a process
    group, `router` is the transformer's AttentionRouter (its calls run through `ContextParallel.attend`),
    `mesh` the hybrid (cfg, ring, ulysses, tensor) device mesh when another dimension shares the world."""
    mode = cp_mode(config)
    plan = cp_plan_for(transformer)
    world, ulysses, ring = _communicators(config, communicator, mesh, device_type)
    state = SequenceState(world, world.world_size, world.rank)
    cp = ContextParallel(config, mode, plan, state, world, ulysses, ring, router=router)
    try:
        for i, (path, spec) in enumerate(plan.entries):
            hook_name = f"{HOOK_PREFIX}.{i}"
            for module in resolve(transformer, path):
                if isinstance(spec, dict):
                    hook = SequenceSplitHook(state, spec, path)
                else:
                    hook = SequenceGatherHook(state, spec)
                    if not all(isinstance(s, ContextParallelOutput) or s is None for s in hook.specs):
                        raise ValueError(f"context-parallel plan entry {path!r}: expected a dict of splits or gathers")
                hooks.attach(module, hook, hook_name)
                cp.attached.append((module, hook_name))
        names = dict(transformer.named_modules())
        for name, module in names.items():
            if hasattr(module, "processor") and any(fnmatch.fnmatchcase(name, p) for p in plan.local_attention):
                hooks.attach(module, LocalAttentionHook(state), f"{HOOK_PREFIX}.local")
                cp.attached.append((module, f"{HOOK_PREFIX}.local"))
        if config.async_ulysses:  # per-family processors: q/k/v projections overlap the all-to-alls
            install_async_ulysses(transformer, cp)
        hooks.attach(transformer, ScopeHook(state), f"{HOOK_PREFIX}.scope")  # last: outermost
        cp.attached.append((transformer, f"{HOOK_PREFIX}.scope"))
        router.wrap(cp.attend)
    except BaseException:
        remove_context_parallel(cp)
        raise
    return cp


def remove_context_parallel(cp: ContextParallel) -> None:
    """Undo `apply_context_parallel` exactly (hooks come off in reverse order)."""
    if cp.router is not None:
        cp.router.unwrap(cp.attend)
    for module, name in reversed(cp.attached):
        hooks.detach(module, name)
    cp.attached.clear()
