"""An example third-party cachedit backend: CPU tensors, gloo, and a query-chunked attention kernel.

It implements only what it adds; everything else (the communicator, compile options) falls
back to cachedit's built-in defaults. Check it with:

    pytest --pyargs cachedit.testing.conformance --cachedit-backend example_cpu
"""

from __future__ import annotations

import math

import torch

import cachedit

NAME = "example_cpu"


def chunked_attention(query, key, value, *, attn_mask=None, is_causal=False, scale=None, return_lse=False,
                      chunk=16):
    """Attention over query chunks (bounded memory), float32 accumulation, with log-sum-exp."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    k, v = key.float(), value.float()
    outs, lses = [], []
    for start in range(0, query.shape[-2], chunk):
        q = query[..., start:start + chunk, :].float()
        s = q @ k.transpose(-1, -2) * scale
        if attn_mask is not None:
            m = attn_mask[..., start:start + chunk, :] if attn_mask.shape[-2] > 1 else attn_mask
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0) @ v)
        lses.append(lse)
    out = torch.cat(outs, dim=-2).to(query.dtype)
    return (out, torch.cat(lses, dim=-1)) if return_lse else out


@cachedit.hookimpl
def cachedit_register_backends(registry):
    registry.add(cachedit.Backend(name=NAME, device_type="cpu", dist_backend="gloo", priority=-10,
                                  description="example out-of-tree backend"))


@cachedit.hookimpl
def cachedit_attention_kernels(backend):
    return [cachedit.AttentionKernel(
        name="chunked", fn=chunked_attention, dtypes=frozenset({torch.float32, torch.bfloat16}),
        head_dims=(8, 256), returns_lse=True, supports_mask=True, supports_causal=False, priority=50,
        description="query-chunked attention with log-sum-exp",
    )]
