"""A communicator wrapper that counts the bytes each collective sends from this rank to others.

Counts come from tensor sizes, not from the wire, so metering costs nothing and never syncs:
all-to-all sends every chunk but its own; a ring step sends the whole tensor; all-gather sends its
tensor to each other rank; all-reduce is counted as a ring all-reduce, 2 (P - 1) / P of the tensor.
"""

from __future__ import annotations

from collections import Counter

import torch

from .communicator import Communicator


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class MeteredCommunicator:
    """Forwards every call to `inner`; `sent[name]` / `calls[name]` accumulate per collective."""

    def __init__(self, inner: Communicator) -> None:
        self.inner = inner
        self.sent: Counter = Counter()
        self.calls: Counter = Counter()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _count(self, name: str, nbytes: float) -> None:
        self.sent[name] += int(nbytes)
        self.calls[name] += 1

    def reset(self) -> None:
        self.sent.clear()
        self.calls.clear()

    def all_to_all(self, tensor, scatter_dim, gather_dim):
        world = self.inner.world_size
        self._count("all_to_all", _nbytes(tensor) * (world - 1) / world)
        return self.inner.all_to_all(tensor, scatter_dim, gather_dim)

    def all_to_all_uneven(self, tensor, scatter_dim, gather_dim, scatter_sizes, gather_sizes, async_op=False):
        own = scatter_sizes[self.inner.rank] / max(tensor.shape[scatter_dim], 1)
        self._count("all_to_all", _nbytes(tensor) * (1 - own))
        return self.inner.all_to_all_uneven(tensor, scatter_dim, gather_dim, scatter_sizes, gather_sizes,
                                            async_op=async_op)

    def send_recv_ring(self, tensor, shift=1, recv_shape=None, async_op=False):
        self._count("send_recv_ring", _nbytes(tensor))
        return self.inner.send_recv_ring(tensor, shift, recv_shape=recv_shape, async_op=async_op)

    def all_gather(self, tensor, dim=0):
        self._count("all_gather", _nbytes(tensor) * (self.inner.world_size - 1))
        return self.inner.all_gather(tensor, dim)

    def all_gather_uneven(self, tensor, dim=0):
        self._count("all_gather", _nbytes(tensor) * (self.inner.world_size - 1))
        return self.inner.all_gather_uneven(tensor, dim)

    def all_reduce(self, tensor, op="sum"):
        world = self.inner.world_size
        self._count("all_reduce", _nbytes(tensor) * 2 * (world - 1) / world)
        return self.inner.all_reduce(tensor, op)
