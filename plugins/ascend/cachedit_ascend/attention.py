"""Attention on Ascend NPUs through `torch_npu.npu_fused_infer_attention_score` (FIA).

FIA is torch_npu's inference attention (graph mode supported, LSE on request); `npu_fusion_attention`
is documented as a training op and, under the plugin's NPU graph backend, torchair's converter passes
it real_shift=None, which silently drops a float mask. As torch_npu 2.13.0 documents FIA
(torch_npu/_op_plugin_docs.py):

    npu_fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None,
        actual_seq_lengths=None, actual_seq_lengths_kv=None, ..., num_heads=1, scale=1.0,
        pre_tokens=2147483647, next_tokens=2147483647, input_layout="BSH", num_key_value_heads=0,
        sparse_mode=0, inner_precise=0, ..., softmax_lse_flag=False, ...) -> (attention_out, softmax_lse)

- Layout "BNSD" is the core's (batch, heads, seq, head_dim); contiguous float16 / bfloat16 only (no
  float32: such calls fall back to the core's kernel). N <= 256, N / KV_N <= 64 (GQA through
  num_key_value_heads), D <= 512; pse_shift needs D divisible by 16, which is declared for all calls.
- Boolean masks (True = masked out, the opposite of torch's) in their compact forms: a key-padding
  mask (keys kept form a prefix per batch) becomes `actual_seq_lengths_kv` and no mask at all; a mask
  shared over the batch stays (Q_S, KV_S); otherwise (B, 1, Q_S, KV_S), the smallest the op takes.
  Per-head boolean masks go through pse_shift as -inf biases (atten_mask has no head axis).
- Float masks go through pse_shift, (1 | B, N, Q_S, KV_S) in the query's dtype (the only shapes the op
  takes). Whether the op adds pse before or after the scale the 2.13 docs say both ways, so these calls
  pass a query already multiplied by the scale and scale=1.0: both readings then compute
  scale * q k^T + pse. Calls asking for the LSE do the same, so its scale is not in question either.
  `cachedit doctor` settles the order on a real device.
- inner_precise=2 (high precision with row-invalid correction) whenever a mask or pse is given: the
  docs warn of precision loss on rows with no kept key otherwise. Rows with no kept key give output 0
  and LSE -inf (cachedit's convention) whatever the op reports there.
- Causal: sparse_mode=3 (bottom-right, like cachedit's causal) with the op's optimised 2048x2048 mask
  when Q_S <= KV_S and no other mask is given; otherwise an explicit mask with sparse_mode=0.
- softmax_lse (B, N, Q_S, 1) float32, the natural-log LSE of the scaled, masked scores.
"""

from __future__ import annotations

import math

import torch

from cachedit import AttentionKernel

MAX_HEADS = 256
MAX_GROUP = 64  # num_heads / num_key_value_heads
MAX_HEAD_DIM = 512
HEAD_DIM_MULTIPLE = 16
_OPTIMISED = 2048  # sparse_mode 2/3/4 take this 2048 x 2048 mask
_HALF = frozenset({torch.float16, torch.bfloat16})


def _as4d(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def _prefix_lengths(keep: torch.Tensor) -> list[int] | None:
    """Per-batch kept-key counts when `keep` (B|1, 1, 1, Sk) keeps a prefix of the keys in every batch."""
    if torch.compiler.is_compiling():  # the lengths are data; a graph takes the mask instead
        return None
    lengths = keep.sum(-1, keepdim=True)
    if not bool((keep == (torch.arange(keep.shape[-1], device=keep.device) < lengths)).all()):
        return None
    return [int(n) for n in lengths.reshape(-1).tolist()]


def make_infer_attention_fn(fused_infer_attention):
    def npu_attention(query, key, value, *, attn_mask=None, is_causal=False, scale=None, return_lse=False):
        b, n, lq, d = query.shape
        nkv, lk = key.shape[1], key.shape[2]
        if n > MAX_HEADS or n % nkv or n // nkv > MAX_GROUP:
            raise ValueError(f"npu_fused_infer_attention_score takes at most {MAX_HEADS} query heads, a multiple "
                             f"of the key/value heads at most {MAX_GROUP} times; got {n} and {nkv}")
        scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        device, dtype = query.device, query.dtype
        keep = pse = None
        if attn_mask is not None:
            m = _as4d(attn_mask)
            if m.dtype != torch.bool:
                pse = m
            elif m.shape[1] > 1:  # per head: atten_mask has no head axis
                pse = torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(~m, float("-inf"))
            else:
                keep = m
        if is_causal and not (keep is None and pse is None and lq <= lk):
            causal = torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)
            keep = causal.reshape(1, 1, lq, lk) if keep is None else keep & causal
        empty = None  # query rows with no kept key, (B|1, N|1, Sq)
        if keep is not None:
            empty = ~keep.any(-1)
        if pse is not None:
            pse_empty = torch.isneginf(pse).all(-1)
            empty = pse_empty if empty is None else empty | pse_empty
        kwargs = dict(num_heads=n, num_key_value_heads=nkv, input_layout="BNSD", softmax_lse_flag=bool(return_lse))
        if is_causal and keep is None and pse is None:
            kwargs.update(sparse_mode=3, atten_mask=torch.ones(_OPTIMISED, _OPTIMISED, dtype=torch.bool,
                                                               device=device).triu(diagonal=1))
        if keep is not None:
            lengths = _prefix_lengths(keep) if keep.shape[2] == 1 else None
            if lengths is not None:
                kwargs["actual_seq_lengths_kv"] = lengths
            elif keep.shape[0] == 1:
                kwargs["atten_mask"] = (~keep.expand(1, 1, lq, lk)).reshape(lq, lk).contiguous()  # (Q_S, KV_S)
            else:
                kwargs["atten_mask"] = (~keep.expand(b, 1, lq, lk)).contiguous()  # (B, 1, Q_S, KV_S)
        if pse is not None:
            kwargs["pse_shift"] = pse.to(dtype).expand(1 if pse.shape[0] == 1 else b, n, lq, lk).contiguous()
        if keep is not None or pse is not None:
            kwargs["inner_precise"] = 2  # row-invalid correction for rows with no kept key
        if pse is not None or return_lse:  # robust to pse before or after the scale, and to the LSE's scale
            query, scale = (query.float() * scale).to(dtype), 1.0
        out, lse = fused_infer_attention(query.contiguous(), key.contiguous(), value.contiguous(), scale=scale,
                                         **kwargs)
        if empty is not None:
            out = out.masked_fill(empty.unsqueeze(-1), 0.0)
        if not return_lse:
            return out
        lse = lse.reshape(b, n, lq).float()
        return out, lse if empty is None else lse.masked_fill(empty, float("-inf"))

    return npu_attention


def infer_attention_kernel(fused_infer_attention) -> AttentionKernel:
    return AttentionKernel(
        name="npu_fused_infer_attention_score", fn=make_infer_attention_fn(fused_infer_attention), dtypes=_HALF,
        head_dims=(HEAD_DIM_MULTIPLE, MAX_HEAD_DIM), head_dim_multiple=HEAD_DIM_MULTIPLE, returns_lse=True,
        supports_mask=True, supports_causal=True, supports_gqa=True, priority=100,
        description="torch_npu.npu_fused_infer_attention_score (BNSD, inference, graph mode), LSE from softmax_lse",
    )
