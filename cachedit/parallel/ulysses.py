"""Ulysses attention: trade the sequence shard for a head shard, attend, trade back.

Each rank holds q/k/v for its own tokens and every head, (batch, heads, seq_local, head_dim). One
all-to-all per tensor turns that into every token and a share of the heads; the kernel attends
over the whole sequence for those heads; one all-to-all brings the output back to the rank that
owns the tokens. Attention is per head, so this is exact.

"Anything": head counts not divisible by the degree get uneven head shares (the first
`heads % degree` ranks take one more) and sequence shards of unequal length are exchanged as
they are, with an uneven all-to-all, so nothing is padded and nothing needs masking. Grouped-
query K/V whose heads don't split alike are repeated to the query heads first.
Options: `fp8` sends per-token float8 codes plus scales (see `fp8.py`); `async_op` posts the
q, k and v exchanges at once and unpacks each as it lands.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import fp8 as fp8_wire
from .communicator import Communicator

HEADS, SEQ = 1, 2  # dims of the (batch, heads, seq, head_dim) layout


def split_sizes(n: int, parts: int) -> list[int]:
    """How `torch.tensor_split(n, parts)` cuts n: the first n % parts get one more."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def gather_lengths(comm: Communicator, *lengths: int, device: torch.device) -> list[list[int]]:
    """Every rank's `lengths`, one list per length (one small all-gather, on `device`: the device of the
    tensors the group exchanges, since NCCL / HCCL take no host tensors)."""
    got = comm.all_gather(torch.tensor([list(lengths)], dtype=torch.int64, device=device))
    return [got[:, i].tolist() for i in range(len(lengths))]


class Exchange:
    """One all-to-all of a (batch, heads, seq, head_dim) tensor, optionally in flight and FP8-packed."""

    def __init__(self, comm: Communicator, x: torch.Tensor, scatter_dim: int, gather_dim: int,
                 scatter_sizes: list[int], gather_sizes: list[int], fp8: bool, async_op: bool) -> None:
        self.dtype = x.dtype
        self.fp8 = fp8
        wire = fp8_wire.pack(x) if fp8 else x
        even = len(set(scatter_sizes)) == 1 and len(set(gather_sizes)) == 1
        self.pending = self.result = None
        if even and not async_op:
            self.result = comm.all_to_all(wire, scatter_dim, gather_dim)
        elif async_op:
            self.pending = comm.all_to_all_uneven(wire, scatter_dim, gather_dim, scatter_sizes, gather_sizes,
                                                  async_op=True)
        else:
            self.result = comm.all_to_all_uneven(wire, scatter_dim, gather_dim, scatter_sizes, gather_sizes)

    def wait(self) -> torch.Tensor:
        out = self.pending.wait() if self.pending is not None else self.result
        return fp8_wire.unpack(out, self.dtype) if self.fp8 else out


def ulysses_attention(comm: Communicator, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      mask: torch.Tensor | None, inner: Callable, *, uneven: bool, fp8: bool = False,
                      async_op: bool = False) -> torch.Tensor:
    """Attention over the whole sequence of `comm`'s ranks for sequence-sharded q/k/v.

    `inner(q, k, v, mask)` attends head-sharded tensors holding the group's whole sequence (a
    kernel, or Ring attention for USP); `mask` is a key mask (batch|1, heads|1, 1, seq_local) or
    None. `uneven` says some rank's shard length may differ (else all equal this rank's).
    """
    world = comm.world_size
    heads, kv_heads = query.shape[HEADS], key.shape[HEADS]
    if uneven:
        q_lens, k_lens = gather_lengths(comm, query.shape[SEQ], key.shape[SEQ], device=query.device)
    else:
        q_lens, k_lens = [query.shape[SEQ]] * world, [key.shape[SEQ]] * world
    q_heads = split_sizes(heads, world)
    if kv_heads == heads:
        kv_split = q_heads
    elif heads % world == 0 and kv_heads % world == 0:
        kv_split = split_sizes(kv_heads, world)  # each query-head share keeps its own K/V groups
    else:
        repeat = heads // kv_heads
        key, value = key.repeat_interleave(repeat, dim=HEADS), value.repeat_interleave(repeat, dim=HEADS)
        kv_split = q_heads

    def send(x, sizes, lens):
        return Exchange(comm, x, HEADS, SEQ, sizes, lens, fp8, async_op)

    # In flight together when async: q is unpacked while k and v are still arriving.
    xq, xk, xv = send(query, q_heads, q_lens), send(key, kv_split, k_lens), send(value, kv_split, k_lens)
    if mask is not None:
        mask = gather_key_mask(comm, mask, q_heads, heads, uneven)
    q, k, v = xq.wait(), xk.wait(), xv.wait()
    out = inner(q, k, v, mask)
    back = Exchange(comm, out, SEQ, HEADS, q_lens, q_heads, fp8, async_op=False)
    return back.wait()


def key_mask(mask: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor | None:
    """The mask as (batch|1, heads|1, 1, keys); masks that depend on the query are refused."""
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[-2] != 1 or mask.shape[-1] != key.shape[-2]:
        raise ValueError(f"context parallelism supports key masks (broadcast over queries, last dim = keys); got "
                         f"an attention mask of shape {tuple(mask.shape)} for {key.shape[-2]} local keys")
    return mask


def gather_key_mask(comm: Communicator, mask: torch.Tensor, head_sizes: list[int], heads: int,
                     uneven: bool) -> torch.Tensor:
    """This rank's heads of the key mask, over every rank's keys (in the order the keys arrive)."""
    if mask.shape[HEADS] == heads and heads > 1:
        start = sum(head_sizes[: comm.rank])
        mask = mask.narrow(HEADS, start, head_sizes[comm.rank])
    wire = mask.to(torch.uint8) if mask.dtype == torch.bool else mask
    wire = comm.all_gather_uneven(wire, dim=-1) if uneven else comm.all_gather(wire.contiguous(), dim=-1)
    return wire.bool() if mask.dtype == torch.bool else wire
