"""NCCL collectives: the core's communicator with NCCL's single-buffer forms.

NCCL's all-gather and reduce-scatter work on one contiguous buffer; the list forms the core uses
(right for gloo) make NCCL copy through per-rank tensors. Here they go through
`all_gather_single` / `reduce_scatter_single` (called `all_gather_into_tensor` /
`reduce_scatter_tensor` before torch 2.13), and the barrier names this rank's device, as NCCL
asks. Float8 exchanges travel as bytes, like the core's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cachedit.parallel.communicator import Communicator

_FLOAT8 = {torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz}
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def _wire(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.contiguous()
    return tensor.view(torch.uint8) if tensor.dtype in _FLOAT8 else tensor


def _all_gather_single(out, inp, group):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _reduce_scatter_single(out, inp, op, group):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, op=op, group=group)


class NcclCommunicator(Communicator):
    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if tensor.dim() == 0:
            return super().all_gather(tensor, dim)
        wire = _wire(tensor)
        out = wire.new_empty((self.world_size * wire.shape[0], *wire.shape[1:]))
        _all_gather_single(out, wire, self.group)
        return torch.cat(out.chunk(self.world_size, dim=0), dim=dim).view(tensor.dtype)

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0, op: str = "sum") -> torch.Tensor:
        world = self.world_size
        if tensor.shape[dim] % world:
            raise ValueError(f"reduce_scatter: dim {dim} of size {tensor.shape[dim]} is not divisible by "
                             f"world size {world}")
        moved = tensor.movedim(dim, 0).contiguous()
        out = moved.new_empty((moved.shape[0] // world, *moved.shape[1:]))
        _reduce_scatter_single(out, moved, _OPS[op], self.group)
        return out.movedim(0, dim).contiguous()

    def barrier(self) -> None:
        if dist.get_backend(self.group) == "nccl":
            dist.barrier(group=self.group, device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier(group=self.group)
