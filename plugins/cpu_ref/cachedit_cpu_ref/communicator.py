"""gloo collectives, with what gloo lacks built from what it has.

gloo moves no float8 tensors, so exchanges (not reductions) send float8 data as raw bytes.
"""

from __future__ import annotations

import torch

from cachedit.parallel.communicator import Communicator

_BYTES_ONLY = {torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz}


def _wire(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.uint8) if tensor.dtype in _BYTES_ONLY else tensor


class GlooCommunicator(Communicator):
    def all_gather(self, tensor, dim=0):
        return super().all_gather(_wire(tensor), dim).view(tensor.dtype)

    def all_to_all(self, tensor, scatter_dim, gather_dim):
        return super().all_to_all(_wire(tensor), scatter_dim, gather_dim).view(tensor.dtype)

    def send_recv_ring(self, tensor, shift=1):
        return super().send_recv_ring(_wire(tensor), shift).view(tensor.dtype)

    def broadcast(self, tensor, src=0):
        return super().broadcast(_wire(tensor), src).view(tensor.dtype)

    def reduce_scatter(self, tensor, dim=0, op="sum"):
        # All-reduce then slice: exact, and independent of gloo's reduce_scatter support.
        return self.all_reduce(tensor, op).chunk(self.world_size, dim=dim)[self.rank].contiguous()
