"""Attention on Ascend NPUs through `torch_npu.npu_fusion_attention`.

As torch_npu 2.13.0 documents it (torch_npu/_op_plugin_docs.py):

    npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                         atten_mask=None, scale=1., keep_prob=1., pre_tockens=2147483647,
                         next_tockens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
                         actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
                         softmax_layout="")
        -> (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, mask_length)

    y = Softmax(Mask(scale * (pse + query @ key^T), atten_mask)); attention = y @ value

- Layout "BNSD" is the core's (batch, heads, seq, head_dim); head_num is the query's N. Query,
  key and value share one dtype: float16, bfloat16 or float32. Head dim 1..768, query heads 1..256,
  key/value heads dividing them (GQA).
- `scale` defaults to 1 in the op, so it is always passed (1/sqrt(head_dim) unless given).
- atten_mask: bool, **True = masked out** (the opposite of torch SDPA's boolean masks), shaped
  SS, 11SS, B1SS or BNSS. A torch boolean mask is inverted and broadcast to one of those.
- Float (additive) masks go through `pse`, which the op adds *before* the scale: pse = mask / scale
  gives scale * q @ k^T + mask. pse must have the query's dtype and be BNSS or 1NSS.
- Causal: sparse_mode=3 (rightDownCausal, bottom-right aligned like cachedit's causal) with the
  op's compressed 2048x2048 upper-triangular mask, when seq_q <= seq_kv and no other mask is given;
  otherwise an explicit mask with sparse_mode=0 (inner_precise=2 for the rows a causal mask with
  seq_q > seq_kv leaves empty).
- softmax_max and softmax_sum have shape (B, N, Sq, 8) in float32 (8 copies per row) and describe the
  scaled, masked scores, so lse = softmax_max + log(softmax_sum).
"""

from __future__ import annotations

import math

import torch

from cachedit import AttentionKernel

MAX_HEADS = 256
MAX_HEAD_DIM = 768
_COMPRESSED = 2048  # the op's compressed causal mask is 2048 x 2048


def make_fusion_attention_fn(npu_fusion_attention):
    def npu_attention(query, key, value, *, attn_mask=None, is_causal=False, scale=None, return_lse=False):
        b, n, lq, d = query.shape
        nkv, lk = key.shape[1], key.shape[2]
        if n > MAX_HEADS:
            raise ValueError(f"npu_fusion_attention takes at most {MAX_HEADS} query heads, got {n}")
        if n % nkv:
            raise ValueError(f"query heads ({n}) must be a multiple of key/value heads ({nkv})")
        scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        device = query.device
        pse, keep = None, None
        if attn_mask is not None:
            m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
            if m.dtype == torch.bool:
                keep = m
            else:
                pse_b = b if m.shape[0] != 1 else 1
                pse = (m.to(torch.float32) / scale).to(query.dtype).expand(pse_b, n, lq, lk).contiguous()
        atten, sparse_mode, inner_precise = None, 0, 0
        if is_causal:
            if keep is None and pse is None and lq <= lk:
                atten = torch.ones(_COMPRESSED, _COMPRESSED, dtype=torch.bool, device=device).triu(diagonal=1)
                sparse_mode = 3
            else:
                causal = torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)
                keep = causal if keep is None else keep & causal
                inner_precise = 2 if lq > lk else 0
        if keep is not None:
            keep = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))
            kb, kn = keep.shape[0], keep.shape[1]
            if kb == 1 and kn == 1:
                atten = ~keep.expand(1, 1, lq, lk).reshape(lq, lk)  # SS
            elif kn == 1:
                atten = ~keep.expand(b, 1, lq, lk)  # B1SS
            else:
                atten = ~keep.expand(b, n, lq, lk)  # BNSS
            atten = atten.contiguous()
        result = npu_fusion_attention(query, key, value, head_num=n, input_layout="BNSD", pse=pse,
                                      atten_mask=atten, scale=scale, keep_prob=1.0, sparse_mode=sparse_mode,
                                      inner_precise=inner_precise)
        out = result[0]
        if not return_lse:
            return out
        softmax_max, softmax_sum = result[1], result[2]
        return out, (softmax_max[..., 0] + torch.log(softmax_sum[..., 0])).float()

    return npu_attention


def fusion_attention_kernel(npu_fusion_attention) -> AttentionKernel:
    return AttentionKernel(
        name="npu_fusion_attention", fn=make_fusion_attention_fn(npu_fusion_attention),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), head_dims=(1, MAX_HEAD_DIM),
        returns_lse=True, supports_mask=True, supports_causal=True, supports_gqa=True, priority=100,
        description="torch_npu.npu_fusion_attention (BNSD), LSE from softmax_max/softmax_sum",
    )
