"""FlashAttention-3's `flash_attn_interface` module (built from the flash-attention repo's hopper/ folder).

Signature of `flash_attn_func` as in hopper/flash_attn_interface.py; the checks are those of
`mha_fwd` in hopper/flash_api.cpp; the result is float64 attention with FlashAttention's causal
alignment (bottom-right) and its empty-row convention (output 0, softmax_lse +inf).
"""

from __future__ import annotations

import importlib.machinery
import types

import torch

from tests.fakes.reference import VendorError, vendor_check, attention64


def make_flash_attn_interface(capability, legacy: bool = False) -> types.ModuleType:
    """`capability()` gives the current device's compute capability. `legacy=True` models releases whose
    flash_attn_func has no return_attn_probs and always returns (out, softmax_lse)."""
    module = types.ModuleType("flash_attn_interface")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn_interface", None)
    module.calls = []

    def _forward(q, k, v, softmax_scale, causal, qv, q_descale, k_descale, v_descale, window_size, attention_chunk,
                 softcap, num_splits, pack_gqa, deterministic, sm_margin):
        vendor_check(capability()[0] >= 8, "FlashAttention only supports Ampere GPUs or newer.")
        vendor_check(q.dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn),
               "FlashAttention only supports fp16, bf16, and fp8_e4m3 data type")
        vendor_check(q.dtype != torch.float8_e4m3fn, "fake: fp8 inputs are not modelled")
        vendor_check(k.dtype == q.dtype, "query and key must have the same dtype")
        vendor_check(v.dtype == q.dtype, "query and value must have the same dtype")
        for t in (q, k, v):
            vendor_check(t.stride(-1) == 1, "Input tensor must have contiguous last dimension")
        vendor_check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, "expected (batch, seqlen, nheads, headdim) tensors")
        b, lq, h, d = q.shape
        vendor_check(k.shape[0] == b, "batch_size must be equal to batch_size_k")
        hk, dv = k.shape[2], v.shape[3]
        vendor_check(d <= 256, "FlashAttention forward only supports head dimension at most 256")
        vendor_check(h % hk == 0, "Number of heads in key/value must divide number of heads in query")
        vendor_check(dv == d, "fake: only V headdim == Q/K headdim is modelled")
        vendor_check(tuple(k.shape) == (b, k.shape[1], hk, d) and tuple(v.shape) == (b, k.shape[1], hk, dv),
               "k and v must be (batch, seqlen_k, nheads_k, headdim)")
        vendor_check(d % 8 == 0, "head_size should be a multiple of 8")
        vendor_check(qv is None and q_descale is None and k_descale is None and v_descale is None,
               "fake: qv / descale inputs are not modelled")
        vendor_check(tuple(window_size) == (-1, -1) and attention_chunk == 0 and softcap == 0.0,
               "fake: local windows, chunks and softcap are not modelled")
        vendor_check(num_splits >= 1, "num_splits must be >= 1 for this call")
        scale = d ** -0.5 if softmax_scale is None else softmax_scale
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        out, lse = attention64(qt, kt, vt, scale=scale, causal="bottom_right" if causal else None)
        lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)  # FA: empty rows -> +inf
        module.calls.append({"shape": tuple(q.shape), "dtype": q.dtype, "causal": bool(causal), "scale": scale})
        return out.transpose(1, 2).contiguous().to(q.dtype), lse.float()

    if legacy:
        def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                            v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                            pack_gqa=None, deterministic=False, sm_margin=0):
            return _forward(q, k, v, softmax_scale, causal, qv, q_descale, k_descale, v_descale, window_size,
                            attention_chunk, softcap, num_splits, pack_gqa, deterministic, sm_margin)
    else:
        def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                            v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                            pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):
            out, lse = _forward(q, k, v, softmax_scale, causal, qv, q_descale, k_descale, v_descale, window_size,
                                attention_chunk, softcap, num_splits, pack_gqa, deterministic, sm_margin)
            return (out, lse) if return_attn_probs else out

    module.flash_attn_func = flash_attn_func
    module.VendorError = VendorError
    return module
