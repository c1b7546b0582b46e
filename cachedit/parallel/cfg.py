"""CFG parallelism: with two ranks, the conditional and unconditional branches run on different ranks.

Two-call pipelines (FLUX true CFG, Qwen-Image, Wan) name each transformer call with
`cache_context("cond")` / `("uncond")`: rank 0 computes the "cond" calls and rank 1 the "uncond"
ones. A call of the other rank's branch returns a buffer shaped like the latents, which the step's
second call fills in place when the two ranks exchange their outputs (pipelines combine the two
predictions only after both calls). Batched-CFG pipelines (SD3, Z-Image, LTX) make one call on a
batch of both branches: each rank computes half of the batch and the halves are gathered.
Either way every rank ends each step with both predictions, so the pipeline continues unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

BRANCHES = ("cond", "uncond")
HOOK_NAME = "cachedit.cfg_parallel"


class _Nothing(BaseState):
    def reset(self) -> None:
        pass


class CfgParallelHook(ModelHook):
    """Runs one CFG branch per rank and exchanges the predictions (see the module docstring)."""

    _is_stateful = True  # so diffusers' cache_context reaches `self.context`

    def __init__(self, comm) -> None:
        super().__init__()
        self.comm = comm
        self.context = StateManager(_Nothing)
        self.mine = BRANCHES[comm.rank]
        self.pending: dict[str, torch.Tensor] = {}  # branch -> this rank's output or the other's buffer
        self.calls = 0

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.pending.clear()
        return module

    def new_forward(self, module: nn.Module, *args, **kwargs):
        info = self.context._context
        name = info.name if info is not None else None
        if name not in BRANCHES:
            return self._batched(module, args, kwargs)
        if name in self.pending:
            raise RuntimeError(f"CFG parallelism: two {name!r} calls without the other branch between them; this "
                               "pipeline does not alternate cond/uncond calls every step (CFG truncation?)")
        if name == self.mine:
            output = self.fn_ref.original_forward(*args, **kwargs)
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

    def _batched(self, module, args, kwargs):
        """One call carries both branches in its batch: each rank computes its half. Batched inputs
        are tensors whose first dim is the batch, or per-sample lists (Z-Image)."""
        names = _param_names(module)
        latents = kwargs.get(names[0], args[0] if args else None)
        batch = len(latents) if isinstance(latents, (list, tuple)) else latents.shape[0]
        if batch % 2:
            raise RuntimeError(f"CFG parallelism: a call with no cond/uncond cache_context has batch {batch}, "
                               "which does not split into the two CFG halves")
        lo, hi = self.comm.rank * (batch // 2), (self.comm.rank + 1) * (batch // 2)

        def take(value):
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
                return value[lo:hi]
            if isinstance(value, (list, tuple)) and len(value) == batch:
                return type(value)(value[lo:hi])
            return value

        args = tuple(take(a) for a in args)
        kwargs = {k: take(v) for k, v in kwargs.items()}
        sample = _sample(self.fn_ref.original_forward(*args, **kwargs))
        if isinstance(sample, (list, tuple)):  # per-sample outputs of equal shape
            sample = list(self.comm.all_gather(torch.stack(list(sample)).contiguous(), dim=0).unbind(0))
        else:
            sample = self.comm.all_gather(sample.contiguous(), dim=0)
        return (sample,) if kwargs.get("return_dict", True) is False else _wrap(sample)


def _sample(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def _wrap(sample: torch.Tensor):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=sample)


def _param_names(module: nn.Module) -> list[str]:
    import inspect

    return list(inspect.signature(type(module).forward).parameters)[1:]


def check_cfg_parallel(config) -> None:
    import torch.distributed as dist

    if config.cfg == 1:
        return
    if config.ulysses > 1 or config.ring > 1 or config.tensor > 1:
        raise NotImplementedError("parallel=: cfg=2 combined with ulysses / ring / tensor is not implemented yet; "
                                  "use cfg=2 alone")
    if not dist.is_initialized() or dist.get_world_size() != 2:
        size = dist.get_world_size() if dist.is_initialized() else "not initialised"
        raise ValueError(f"ParallelConfig.cfg=2 needs torch.distributed with world size 2 (got {size}); launch with "
                         "torchrun --nproc-per-node 2")


def apply_cfg_parallel(transformer: nn.Module, comm) -> CfgParallelHook:
    from .. import hooks

    hook = CfgParallelHook(comm)
    hooks.attach(transformer, hook, HOOK_NAME)  # last: outermost, so a skipped call skips everything
    return hook


def remove_cfg_parallel(transformer: nn.Module) -> None:
    from .. import hooks

    hooks.detach(transformer, HOOK_NAME)
