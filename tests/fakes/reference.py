"""What every fake shares: float64 attention computing what a vendor kernel documents ((B, H, S, D) layout), and
`vendor_check`, which raises what a vendor library raises on an argument it rejects."""

from __future__ import annotations

import math

import torch


class VendorError(RuntimeError):
    """What a real vendor library raises (torch's TORCH_CHECK surfaces as RuntimeError)."""


def vendor_check(ok: bool, msg: str) -> None:
    if not ok:
        raise VendorError(msg)


def attention64(q, k, v, *, scale=None, keep=None, bias=None, causal=None, pre_scale_bias=None,
                return_max=False):
    """softmax(scale * (q k^T + pre_scale_bias) + bias, masked by keep and causal) v in float64.

    keep: bool, True = attend (broadcastable to (B, H, Sq, Sk)); bias: additive after the scale;
    causal: None, "top_left" (torch SDPA's is_causal) or "bottom_right" (FlashAttention, cachedit).
    GQA: key/value heads are repeated (head i uses kv head i // (H / Hkv)). Rows with nothing to
    attend to give output 0 and lse -inf.
    Returns (out float64, lse float64 (B, H, Sq)), plus the row max of the scores if `return_max`.
    """
    q, k, v = q.double(), k.double(), v.double()
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2)
    if pre_scale_bias is not None:
        s = s + pre_scale_bias.double()
    s = s * scale
    if bias is not None:
        s = s + bias.double()
    lq, lk = s.shape[-2:]
    allowed = torch.ones(s.shape, dtype=torch.bool)
    if causal is not None:
        diag = 0 if causal == "top_left" else lk - lq
        allowed = allowed & torch.ones(lq, lk, dtype=torch.bool).tril(diag)
    if keep is not None:
        allowed = allowed & keep.to(torch.bool)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    w = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    return (w @ v, lse, s.amax(-1)) if return_max else (w @ v, lse)


def random_qkv(dtype, sq=37, sk=29, heads=4, kv_heads=4, dim=64, seed=0):
    """Seeded q, k, v in (batch, heads, seq, dim), drawn in float64 and cast to `dtype`."""
    g = torch.Generator().manual_seed(seed)

    def make(seq, h):
        return torch.randn(2, h, seq, dim, generator=g, dtype=torch.float64).to(dtype)

    return make(sq, heads), make(sk, kv_heads), make(sk, kv_heads)


def max_err(out, ref):
    return (out.double() - ref).abs().max().item()


def route_forward(monkeypatch, model, router) -> None:
    """Run every call of `model` inside `router` (an AttentionRouter), for the length of the test."""
    forward = model.forward

    def routed(*args, **kw):
        with router:
            return forward(*args, **kw)

    monkeypatch.setattr(model, "forward", routed)

