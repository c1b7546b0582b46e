"""The collectives parallel plans need, as one small interface a backend can specialise.

`Communicator` implements them on plain `torch.distributed`; a backend plugin returns it (or a
subclass that swaps in what its library lacks or does faster) from `cachedit_communicator`.
All methods take and return whole tensors; shapes must match across ranks unless stated.
Exchanges (not reductions) move float8 tensors as raw bytes, which every library can carry.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist


class Communicator:
    """Collectives over one process group."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce across ranks ("sum", "max", "min", "avg"); returns a new tensor."""
        out = tensor.clone()
        if op == "avg":
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
            return out / self.world_size
        dist.all_reduce(out, op=_REDUCE_OPS[op], group=self.group)
        return out

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's tensor along `dim`, in rank order."""
        wire = _as_bytes(tensor.contiguous())
        parts = [torch.empty_like(wire) for _ in range(self.world_size)]
        dist.all_gather(parts, wire, group=self.group)
        return torch.cat(parts, dim=dim).view(tensor.dtype)

    def all_gather_uneven(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Like all_gather, but each rank's size along `dim` may differ."""
        size = torch.tensor([tensor.shape[dim]], dtype=torch.int64, device=tensor.device)
        sizes = [int(s) for s in self.all_gather(size)]
        padded = _pad_to(tensor, dim, max(sizes))
        gathered = self.all_gather(padded, dim=dim).split(max(sizes), dim=dim)
        return torch.cat([g.narrow(dim, 0, s) for g, s in zip(gathered, sizes)], dim=dim)

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0, op: str = "sum") -> torch.Tensor:
        """Reduce across ranks, then keep this rank's equal chunk along `dim`."""
        chunks = [c.contiguous() for c in tensor.chunk(self.world_size, dim=dim)]
        out = torch.empty_like(chunks[self.rank])
        dist.reduce_scatter(out, chunks, op=_REDUCE_OPS[op], group=self.group)
        return out

    def all_to_all(self, tensor: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        """Split `scatter_dim` into world_size equal chunks, send chunk i to rank i, concatenate
        what arrives along `gather_dim` (the Ulysses exchange)."""
        world = self.world_size
        if tensor.shape[scatter_dim] % world:
            raise ValueError(f"all_to_all: dim {scatter_dim} of size {tensor.shape[scatter_dim]} "
                             f"is not divisible by world size {world}")
        moved = _as_bytes(tensor.movedim(scatter_dim, 0).contiguous())
        out = torch.empty_like(moved)
        dist.all_to_all_single(out, moved, group=self.group)
        chunks = out.view(tensor.dtype).chunk(world, dim=0)
        return torch.cat([c.movedim(0, scatter_dim) for c in chunks], dim=gather_dim)

    def all_to_all_uneven(self, tensor: torch.Tensor, scatter_dim: int, gather_dim: int, scatter_sizes: list[int],
                          gather_sizes: list[int], async_op: bool = False):
        """all_to_all with uneven chunks: the `scatter_sizes[i]` slice of `scatter_dim` goes to rank i; what
        arrives from rank i has size `gather_sizes[i]` along `gather_dim` (this rank's `scatter_sizes[rank]` along
        `scatter_dim`) and is concatenated along `gather_dim` in rank order. Every rank's `scatter_sizes` are
        the others' `gather_sizes` (Ulysses with head or sequence counts not divisible by the world size).
        With `async_op=True` returns a `Pending` whose `wait()` gives the result."""
        world, rank = self.world_size, self.rank
        if len(scatter_sizes) != world or len(gather_sizes) != world or sum(scatter_sizes) != tensor.shape[scatter_dim]:
            raise ValueError(f"all_to_all_uneven: scatter_sizes {scatter_sizes} / gather_sizes {gather_sizes} must "
                             f"have {world} entries, scatter_sizes summing to dim {scatter_dim} "
                             f"(size {tensor.shape[scatter_dim]})")
        send = torch.cat([_as_bytes(c.contiguous()).reshape(-1)
                          for c in tensor.split(list(scatter_sizes), dim=scatter_dim)])
        shapes = []
        for size in gather_sizes:
            shape = list(tensor.shape)
            shape[scatter_dim], shape[gather_dim] = scatter_sizes[rank], size
            shapes.append(shape)
        recv_numel = [math.prod(s) for s in shapes]
        send_numel = [math.prod(c.shape) for c in tensor.split(list(scatter_sizes), dim=scatter_dim)]
        if async_op and torch.compiler.is_compiling():
            # Dynamo cannot trace async_op=True; a functional collective is asynchronous by itself (it is
            # waited for where its result is first used), and the compiled graph keeps that overlap.
            from torch.distributed import _functional_collectives as funcol

            recv = funcol.all_to_all_single(send, recv_numel, send_numel, self.group or dist.group.WORLD)
            work = []
        else:
            recv = send.new_empty(sum(recv_numel))
            work = dist.all_to_all_single(recv, send, recv_numel, send_numel, group=self.group, async_op=async_op)

        def finish() -> torch.Tensor:
            parts = [p.view(s) for p, s in zip(recv.split(recv_numel), shapes)]
            return torch.cat(parts, dim=gather_dim).view(tensor.dtype)

        return Pending(work, finish) if async_op else finish()

    def send_recv_ring(self, tensor: torch.Tensor, shift: int = 1, recv_shape: tuple | None = None,
                       async_op: bool = False):
        """Send to rank+shift and receive from rank-shift (the Ring attention K/V rotation). What arrives
        has `tensor`'s shape unless `recv_shape` says otherwise (uneven sequence shards). With
        `async_op=True` returns a `Pending` whose `wait()` gives the received tensor."""
        world, rank = self.world_size, self.rank
        dst = dist.get_global_rank(self.group, (rank + shift) % world) if self.group else (rank + shift) % world
        src = dist.get_global_rank(self.group, (rank - shift) % world) if self.group else (rank - shift) % world
        wire = _as_bytes(tensor.contiguous())
        if torch.compiler.is_compiling():  # Dynamo breaks the graph at P2P ops: a traceable exchange instead
            return self._ring_functional(wire, tensor.dtype, shift, recv_shape, async_op)
        out = wire.new_empty(tuple(recv_shape)) if recv_shape is not None else torch.empty_like(wire)
        ops = [dist.P2POp(dist.isend, wire, dst, self.group), dist.P2POp(dist.irecv, out, src, self.group)]
        reqs = dist.batch_isend_irecv(ops)

        def finish() -> torch.Tensor:
            return out.view(tensor.dtype)

        if async_op:
            return Pending(reqs, finish)
        for req in reqs:
            req.wait()
        return finish()

    def _ring_functional(self, wire, dtype, shift, recv_shape, async_op):
        """The ring shift as a functional all-to-all in which only the neighbours' chunks are non-empty."""
        from torch.distributed import _functional_collectives as funcol

        world, rank = self.world_size, self.rank
        shape = tuple(recv_shape) if recv_shape is not None else tuple(wire.shape)
        send_sizes, recv_sizes = [0] * world, [0] * world
        send_sizes[(rank + shift) % world] = wire.numel()
        recv_sizes[(rank - shift) % world] = math.prod(shape)
        out = funcol.all_to_all_single(wire.reshape(-1), recv_sizes, send_sizes, self.group or dist.group.WORLD)

        def finish() -> torch.Tensor:
            return out.view(shape).view(dtype)

        return Pending([], finish) if async_op else finish()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Every rank gets rank `src`'s tensor (src is a rank within the group)."""
        out = _as_bytes(tensor.clone())
        global_src = dist.get_global_rank(self.group, src) if self.group else src
        dist.broadcast(out, global_src, group=self.group)
        return out.view(tensor.dtype)

    def barrier(self) -> None:
        dist.barrier(group=self.group)


class Pending:
    """An exchange in flight (`async_op=True`): `wait()` blocks until it lands and returns the result."""

    def __init__(self, works, finish: Callable[[], torch.Tensor]) -> None:
        self._works = works if isinstance(works, (list, tuple)) else [works]
        self._finish = finish
        self._result: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            for work in self._works:
                work.wait()
            self._result = self._finish()
        return self._result


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


_FLOAT8 = {torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz}


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.uint8) if tensor.dtype in _FLOAT8 else tensor


def _pad_to(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if tensor.shape[dim] == size:
        return tensor.contiguous()
    pad_shape = list(tensor.shape)
    pad_shape[dim] = size - tensor.shape[dim]
    return torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
