"""CFG parallelism: the conditional and unconditional branches run on different halves of the ranks.

Two-call pipelines (FLUX true CFG, Qwen-Image, Wan) name each transformer call with
`cache_context("cond")` / `("uncond")`: cfg rank 0 computes the "cond" calls and cfg rank 1 the
"uncond" ones. A call of the other half's branch returns a buffer shaped like the latents, which the
step's second call fills in place when the two halves exchange their outputs (pipelines combine the
two predictions only after both calls). Batched-CFG pipelines (SD3, Z-Image, LTX) make one call on a
batch of both branches: each half computes half of the batch and the halves are gathered.
Either way every rank ends each step with both predictions, so the pipeline continues unchanged.

A call's topology is what its first step shows, before any rank diverges: every rank computes the
first step's calls as one process would (the price: that step is not split). If the step made both a
"cond" and an "uncond" call, each half runs its own branch from the second step on; if it made one
(a call without CFG, e.g. `true_cfg_scale=1`), every rank runs that branch for the whole call. A
batched call whose batch does not split in two (no CFG) runs whole on every rank. The exchange state
lives for one pipeline call: it starts fresh at the call's start and is dropped however it ends
(`lifecycle.py`), so an aborted call never poisons the next one on any rank.

Combined with context / tensor parallelism the world is the (cfg, ring, ulysses, tensor) mesh
(`mesh.hybrid_mesh`): each CFG half runs its branch with its own context- and tensor-parallel
groups, and the exchange goes over the "cfg" group (the two ranks with the same coordinate in the
other dimensions, so holding the same shards). Cache state per branch lives on the half running it;
for batched calls the cache statistic is also averaged over the cfg group, so both halves decide as
one process deciding on the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.hooks import ModelHook

from .. import hooks
from ..adapters import param_names
from .._diffusers_compat import BaseState, StateManager, current_context, mark_stateful, original_forward

BRANCHES = ("cond", "uncond")
HOOK_NAME = "cachedit.cfg_parallel"


class _Nothing(BaseState):
    def reset(self) -> None:
        pass


class CfgParallelHook(ModelHook):
    """Runs one CFG branch per rank and exchanges the predictions (see the module docstring)."""

    def __init__(self, comm, on_split=None) -> None:
        super().__init__()
        mark_stateful(self)  # so diffusers' cache_context reaches `self.context`, and its reset `reset_state`
        self.comm = comm  # over the cfg group: rank 0 runs "cond", rank 1 "uncond"
        self.batched = False  # inside a batched-CFG call: cache statistics span both halves
        self.on_split = on_split  # on_split(branch): the other half's branch, whose state this half drops
        self.context = StateManager(_Nothing)
        self.mine = BRANCHES[comm.rank]
        # Per call (reset at every pipeline call's start and exit):
        self.split: bool | None = None  # the call's topology: None until known; True: one branch per half
        self.seen: list[str] = []  # the branches of the call's first step, while its topology is unknown
        self.pending: dict[str, torch.Tensor] = {}  # branch -> this rank's output or the other's buffer

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.split = None
        self.seen.clear()
        self.pending.clear()
        return module

    def new_forward(self, module: nn.Module, *args, **kwargs):
        info = current_context(self.context)
        name = info.name if info is not None else None
        if name not in BRANCHES:
            return self._batched(module, args, kwargs)
        if self.split is None:
            if name not in self.seen:  # the call's first step: every rank computes it, as one process would
                self.seen.append(name)
                return original_forward(self)(*args, **kwargs)
            self._known(split=set(self.seen) == set(BRANCHES))
        if not self.split:  # a call without CFG: every rank computes its one branch
            return original_forward(self)(*args, **kwargs)
        if name in self.pending:
            raise RuntimeError(f"CFG parallelism: two {name!r} calls without the other branch between them; this "
                               "pipeline call stopped alternating cond/uncond calls after its first step (CFG "
                               "truncation?), which parallel=dict(cfg=2) cannot split (the next call starts afresh)")
        if name == self.mine:
            output = original_forward(self)(*args, **kwargs)
            self.pending[name] = _sample(output)
        else:
            latents = kwargs.get("hidden_states", args[0] if args else None)
            self.pending[name] = torch.empty_like(latents)
            output = (self.pending[name],) if kwargs.get("return_dict", True) is False else _wrap(self.pending[name])
        if len(self.pending) == 2:
            theirs = BRANCHES[1 - self.comm.rank]
            gathered = self.comm.all_gather(self.pending[self.mine].contiguous().unsqueeze(0), dim=0)
            if gathered.shape[1:] != self.pending[theirs].shape:
                raise RuntimeError(f"CFG parallelism: the transformer's output {tuple(gathered.shape[1:])} is not "
                                   f"shaped like its latents {tuple(self.pending[theirs].shape)}")
            self.pending[theirs].copy_(gathered[1 - self.comm.rank])
            self.pending.clear()
        return output

    def _known(self, split: bool) -> None:
        """The call's first step showed its topology: both branches (from now on each half runs its own,
        and drops the cache state of the other's first step) or one (every rank keeps running it)."""
        self.split = split
        if split and self.on_split is not None:
            self.on_split(BRANCHES[1 - self.comm.rank])

    def _batched(self, module, args, kwargs):
        """One call carries both branches in its batch: each rank computes its half. Batched inputs
        are tensors whose first dim is the batch, or per-sample lists (Z-Image)."""
        names = param_names(type(module))
        latents = kwargs.get(names[0], args[0] if args else None)
        batch = len(latents) if isinstance(latents, (list, tuple)) else latents.shape[0]
        if batch % 2:  # no cond/uncond pair in it (a call without CFG): every rank computes the whole batch
            return original_forward(self)(*args, **kwargs)
        lo, hi = self.comm.rank * (batch // 2), (self.comm.rank + 1) * (batch // 2)

        def take(value):
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
                return value[lo:hi]
            if isinstance(value, (list, tuple)) and len(value) == batch:
                return type(value)(value[lo:hi])
            return value

        args = tuple(take(a) for a in args)
        kwargs = {k: take(v) for k, v in kwargs.items()}
        self.batched = True
        try:
            sample = _sample(original_forward(self)(*args, **kwargs))
        finally:
            self.batched = False
        if isinstance(sample, (list, tuple)):  # per-sample outputs of equal shape
            sample = list(self.comm.all_gather(torch.stack(list(sample)).contiguous(), dim=0).unbind(0))
        else:
            sample = self.comm.all_gather(sample.contiguous(), dim=0)
        return (sample,) if kwargs.get("return_dict", True) is False else _wrap(sample)

    def reduce(self, stats: torch.Tensor) -> torch.Tensor:
        """A stage of the cache's reducer chain (after the context-parallel one): in a batched call, the
        average over the two halves of the batch (equal halves: the mean over the whole batch). Per-sample
        statistics (rows, `CacheConfig.per_sample`) belong to this half's own samples: not averaged."""
        return self.comm.all_reduce(stats, "avg") if self.batched and stats.dim() == 1 else stats


def _sample(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def _wrap(sample: torch.Tensor):
    from .._diffusers_compat import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=sample)


def apply_cfg_parallel(transformer: nn.Module, comm, on_split=None) -> CfgParallelHook:
    """Hook `transformer` (outermost) to run one CFG branch per half over `comm` (the cfg group);
    `on_split(branch)` is told which branch this half stops running once a call's topology is known."""
    hook = CfgParallelHook(comm, on_split)
    hooks.attach(transformer, hook, HOOK_NAME)  # last: outermost, so a skipped call skips everything
    return hook


def remove_cfg_parallel(transformer: nn.Module) -> None:
    hooks.detach(transformer, HOOK_NAME)
