"""Ring attention: keep the queries, pass K/V blocks around the ring, merge with log-sum-exp.

Each rank attends its query shard to one K/V block at a time: its own, then the block of the rank
before it, and so on, for `world` steps. While a block is attended the next one is already on
its way (`send_recv_ring(async_op=True)`). Every partial result comes with its log-sum-exp, so
partial softmaxes merge exactly:

    lse = logaddexp(lse_a, lse_b),   out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

The kernel must declare `returns_lse`. K and V travel as one tensor (concatenated on head_dim).
Shards of unequal length are fine: each rank learns the block lengths once per call. Key masks
(broadcast over queries) are gathered once and cut per block; a block whose mask keeps no key for a
row gets LSE -inf on that row before merging, whatever the kernel reported there.
"""

from __future__ import annotations

import torch

from .communicator import Communicator
from .ulysses import SEQ, gather_lengths


def merge(out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor, block_lse: torch.Tensor):
    """Fold one block's (output, lse) into the running (output, lse), in float32."""
    block_out, block_lse = block_out.float(), block_lse.float()
    if out is None:
        return block_out, block_lse
    new = torch.logaddexp(lse, block_lse)
    # A row whose keys were all masked so far has lse = -inf: its weight is 0, not nan.
    w_old = torch.exp(lse - new).nan_to_num(0.0).unsqueeze(-1)
    w_new = torch.exp(block_lse - new).nan_to_num(0.0).unsqueeze(-1)
    return out * w_old + block_out * w_new, new


def _no_key_is_minus_inf(lse: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LSE -inf on the rows whose block mask keeps no key: kernels differ there (the mem-efficient one may
    report 0), and a finite LSE would give the block's zero output a weight in the merge."""
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    empty = ~mask.any(-1) if mask.dtype == torch.bool else torch.isneginf(mask).all(-1)
    return lse.masked_fill(empty, float("-inf"))


def ring_attention(comm: Communicator, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   mask: torch.Tensor | None, scale: float | None, kernel, *, uneven: bool) -> torch.Tensor:
    """Attention of this rank's queries over the keys of every rank of `comm`."""
    world, rank = comm.world_size, comm.rank
    lens = gather_lengths(comm, key.shape[SEQ], device=key.device)[0] if uneven else [key.shape[SEQ]] * world
    masks = None
    if mask is not None:
        wire = mask.to(torch.uint8) if mask.dtype == torch.bool else mask
        full = comm.all_gather_uneven(wire, dim=-1) if uneven else comm.all_gather(wire.contiguous(), dim=-1)
        masks = [m.bool() if mask.dtype == torch.bool else m for m in full.split(lens, dim=-1)]
    d_k = key.shape[-1]
    kv = torch.cat([key, value], dim=-1)
    out = lse = None
    for step in range(world):
        owner = (rank - step) % world
        pending = None
        if step < world - 1:
            shape = list(kv.shape)
            shape[SEQ] = lens[(owner - 1) % world]
            pending = comm.send_recv_ring(kv, recv_shape=tuple(shape), async_op=True)
        block_mask = None if masks is None else masks[owner]
        block_out, block_lse = kernel.fn(query, kv[..., :d_k], kv[..., d_k:], attn_mask=block_mask,
                                         is_causal=False, scale=scale, return_lse=True)
        if block_mask is not None:
            block_lse = _no_key_is_minus_inf(block_lse, block_mask)
        out, lse = merge(out, lse, block_out, block_lse)
        if pending is not None:
            kv = pending.wait()
    return out.to(query.dtype)
