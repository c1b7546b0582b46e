"""The split and gather hooks a context-parallel plan puts on a transformer's modules.

Splits cut with `tensor_split` (the first `n % world` ranks get one more token), so any length
>= the degree works; every split tells the plan's `SequenceState` whether it was uneven, and the
attention and the gathers then exchange lengths only when one was. Splits return views of the
caller's tensor, so identities that caches key on (the text embedding naming a CFG branch) stay
stable from step to step.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
from diffusers.hooks import ModelHook

from .._diffusers_compat import original_forward
from .plans import ContextParallelInput, ContextParallelOutput


class SequenceState:
    """What the hooks and the attention share during one transformer call."""

    def __init__(self, comm, world_size: int, rank: int) -> None:
        self.comm = comm  # over every rank of the context-parallel group
        self.world_size = world_size
        self.rank = rank
        self.uneven = False  # some split of this call was uneven: shard lengths differ across ranks
        self.local_depth = 0  # > 0 inside an attention module whose K/V are replicated

    def shard(self, x: torch.Tensor, dim: int, what: str) -> torch.Tensor:
        n = x.shape[dim]
        if n < self.world_size:
            raise ValueError(f"context parallelism: {what} has {n} tokens on dim {dim}, fewer than the "
                             f"{self.world_size} ranks it is split over; use a longer sequence or fewer ranks")
        if n % self.world_size:
            self.uneven = True
        return x.tensor_split(self.world_size, dim=dim)[self.rank]

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.uneven:
            return self.comm.all_gather_uneven(x.contiguous(), dim=dim)
        return self.comm.all_gather(x.contiguous(), dim=dim)


def _fits(x, spec) -> bool:
    return torch.is_tensor(x) and (spec.expected_dims is None or x.dim() == spec.expected_dims)


class ScopeHook(ModelHook):
    """Outermost on the transformer: each call starts with no uneven split seen."""

    def __init__(self, state: SequenceState) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        self.state.uneven = False
        self.state.local_depth = 0
        return args, kwargs


class SequenceSplitHook(ModelHook):
    """Splits the named inputs on the way in and the indexed outputs (`split_output`) on the way out."""

    def __init__(self, state: SequenceState, spec: dict, where: str) -> None:
        super().__init__()
        self.state = state
        self.inputs = {k: v for k, v in spec.items() if isinstance(k, str)}
        self.outputs = {k: v for k, v in spec.items() if isinstance(k, int)}
        self.where = where

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self.params = list(inspect.signature(type(module).forward).parameters)[1:]
        return module

    def _split(self, value, spec, what):
        if isinstance(spec, (list, tuple)):  # a tuple argument, one spec per element
            return type(value)(self._split(v, s, f"{what}[{i}]") for i, (v, s) in enumerate(zip(value, spec)))
        return self.state.shard(value, spec.split_dim, what) if _fits(value, spec) else value

    def pre_forward(self, module, *args, **kwargs):
        args = list(args)
        for name, spec in self.inputs.items():
            if isinstance(spec, ContextParallelInput) and spec.split_output:
                continue
            what = f"input {name!r} of {self.where or 'the transformer'}"
            if name in kwargs:
                kwargs[name] = self._split(kwargs[name], spec, what)
            elif name in self.params and self.params.index(name) < len(args):
                i = self.params.index(name)
                args[i] = self._split(args[i], spec, what)
        return tuple(args), kwargs

    def post_forward(self, module, output):
        if not self.outputs:
            return output
        single = torch.is_tensor(output)
        out = [output] if single else list(output)
        for i, spec in self.outputs.items():
            out[i] = self._split(out[i], spec, f"output {i} of {self.where}")
        return out[0] if single else type(output)(out)


class SequenceGatherHook(ModelHook):
    """Gathers outputs across ranks on the way out (the sequence is whole again after this module)."""

    def __init__(self, state: SequenceState, spec) -> None:
        super().__init__()
        self.state = state
        self.specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]

    def post_forward(self, module, output):
        single = torch.is_tensor(output)
        out = [output] if single else list(output)
        for i, spec in enumerate(self.specs):
            if isinstance(spec, ContextParallelOutput) and _fits(out[i], spec):
                out[i] = self.state.gather(out[i], spec.gather_dim)
        return out[0] if single else type(output)(out)


class LocalAttentionHook(ModelHook):
    """Marks an attention module whose keys and values are whole on every rank: no exchange."""

    def __init__(self, state: SequenceState) -> None:
        super().__init__()
        self.state = state

    def new_forward(self, module, *args, **kwargs):
        self.state.local_depth += 1
        try:
            return original_forward(self)(*args, **kwargs)
        finally:
            self.state.local_depth -= 1
