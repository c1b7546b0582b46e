"""Math attention that also returns the log-sum-exp, computed in float32 (float64 for float64 input)."""

from __future__ import annotations

import math

import torch


def math_attention(query, key, value, *, attn_mask=None, is_causal=False, scale=None, return_lse=False):
    """softmax(q k^T * scale + mask) v in (batch, heads, seq, head_dim) layout.

    Grouped-query attention (fewer K/V heads) repeats K/V heads. The LSE is
    log(sum(exp(scores))) per query row, float32, shape (batch, heads, seq_q): what Ring attention
    needs to merge partial results.
    """
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k, v = query.to(acc), key.to(acc), value.to(acc)
    if k.shape[-3] != q.shape[-3]:
        repeat = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(repeat, dim=-3), v.repeat_interleave(repeat, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if is_causal:
        lq, lk = scores.shape[-2:]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(acc)
    lse = torch.logsumexp(scores, dim=-1)
    # Rows with every key masked give lse=-inf; define their output as 0, as flash kernels do.
    weights = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
    out = torch.matmul(weights, v).to(query.dtype)
    return (out, lse.float()) if return_lse else out
