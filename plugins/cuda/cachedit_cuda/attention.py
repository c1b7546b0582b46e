"""CUDA attention kernels, offered by capability, highest priority first:

    fa3 (400) > cudnn_sdpa (300) > flash_sdpa (200) > [cudnn_sdpa (150)] > efficient_sdpa (100) > torch_sdpa (-100)

cuDNN ranks above flash only where torch itself prefers it (cuDNN >= 9.15 on sm90 / sm100, sdp_utils.cpp
`check_prefer_cudnn_attention`), below it elsewhere. Rows whose mask keeps no key give output 0 and
LSE -inf from every kernel (cuDNN is given -65504 for masked positions, as torch gives it, which makes
such rows an average; the mem-efficient kernel's LSE there is not documented), so Ring merging and
padding keys stay exact.

Every kernel takes and returns the core's (batch, heads, seq, head_dim) layout, and with
`return_lse=True` also the float32 log-sum-exp of the scaled scores, shape (batch, heads, seq_q).
What each one declares comes from its vendor's own checks (so the core never routes a call a
kernel would reject):

- fa3: FlashAttention-3 (`flash_attn_interface.flash_attn_func`, built from the flash-attention
  repo's hopper/ folder). Offered only on compute capability 9.x. Takes (batch, seq, heads, dim)
  with a unit last stride, fp16/bf16, head_dim <= 256 and a multiple of 8 (hopper/flash_api.cpp),
  GQA when heads % kv_heads == 0, causal aligned bottom-right, no arbitrary masks. Returns the
  output, or (output, softmax_lse (batch, heads, seq_q) float32) with return_attn_probs=True.
- cudnn_sdpa / flash_sdpa / efficient_sdpa: torch's own CUDA kernels pinned with
  `torch.nn.attention.sdpa_kernel([SDPBackend.X])` around `F.scaled_dot_product_attention`; the
  LSE comes from the aten ops that return it (`_scaled_dot_product_cudnn_attention` logsumexp
  (B, H, Sq, 1), `_scaled_dot_product_flash_attention` (B, H, Sq), and
  `_scaled_dot_product_efficient_attention` (B, H, ceil(Sq / 32) * 32), sliced). Constraints as in
  torch's aten/src/ATen/native/transformers/cuda/sdp_utils.cpp.

Causal attention means bottom-right alignment everywhere in cachedit (`tril(diagonal=Sk - Sq)`, as
cpu_ref computes). torch SDPA's own `is_causal` is top-left for Sq != Sk, so non-square causal
calls are sent with an explicit mask instead (kernels that take masks) or refused (flash_sdpa).
"""

from __future__ import annotations

import importlib
import inspect
import math

import torch
import torch.nn.attention  # noqa: F401  (sdpa_kernel is looked up at call time)
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from cachedit import AttentionKernel

from .device import all_in, describe

HALF = frozenset({torch.float16, torch.bfloat16})


# -- shared helpers -----------------------------------------------------------------------------
def _causal_keep(lq: int, lk: int, device) -> torch.Tensor:
    """Bottom-right aligned causal mask, True = attend (cachedit's and FlashAttention's convention)."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)


def _merge_causal(attn_mask, lq: int, lk: int, device):
    keep = _causal_keep(lq, lk, device)
    if attn_mask is None:
        return keep
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return attn_mask + torch.zeros(keep.shape, dtype=attn_mask.dtype, device=device).masked_fill(~keep, float("-inf"))


def _repeat_kv(query, key, value):
    if key.shape[1] == query.shape[1]:
        return key, value
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key/value heads ({key.shape[1]})")
    rep = query.shape[1] // key.shape[1]
    return key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)


CUDNN_MASKED = -65504.0  # torch gives cuDNN this, not -inf, for masked-out positions (a cuDNN issue with -inf)


def _empty_rows(attn_mask, lq: int):
    """Query rows whose mask keeps no key, (B|1, H|1, Sq) bool; None when there is no mask."""
    if attn_mask is None:
        return None
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    empty = ~mask.any(-1) if mask.dtype == torch.bool else torch.isneginf(mask).all(-1)
    return empty.expand(*empty.shape[:2], lq)


def _finite_mask(attn_mask, dtype):
    """A mask for cuDNN: booleans become a -65504 bias, -inf biases are clamped to -65504."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(~attn_mask,
                                                                                              CUDNN_MASKED)
    return attn_mask.to(dtype).clamp(min=CUDNN_MASKED)


def _additive_bias(attn_mask, query, key, align: int = 8, masked: float = float("-inf")):
    """The mask as the float bias the aten kernels take, as torch's own SDPA prepares it
    (`preprocess_mask` in aten/src/ATen/native/transformers/cuda/attention.cu): query's dtype, last
    dim padded in memory to a multiple of `align`, then expanded (no copy) to (B, H, Sq, Sk).
    Masked-out positions get `masked` (-65504 for cuDNN, as torch gives it)."""
    if attn_mask is None:
        return None
    b, h, lq, _ = query.shape
    lk = key.shape[-2]
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, masked)
    else:
        bias = mask.to(query.dtype)
        if masked != float("-inf"):
            bias = bias.clamp(min=masked)
    if bias.shape[-1] % align or any(s % align for s in bias.stride()[:-1] if s):
        padded = torch.zeros(*bias.shape[:-1], -(-bias.shape[-1] // align) * align, dtype=bias.dtype,
                             device=bias.device)
        padded[..., : bias.shape[-1]] = bias
        bias = padded[..., : bias.shape[-1]]
    return bias.expand(b, h, lq, lk)


# -- torch's CUDA SDPA backends ---------------------------------------------------------------------
def _lse_flash(query, key, value, bias, is_causal, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal, False,
                                                                   scale=scale)[:2]
    return out, lse


def _lse_cudnn(query, key, value, bias, is_causal, scale):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(query, key, value, bias, True, 0.0, is_causal,
                                                                   False, scale=scale)[:2]
    return out, lse.reshape(query.shape[:-1])  # (B, H, Sq, 1) -> (B, H, Sq)


def _lse_efficient(query, key, value, bias, is_causal, scale):
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, 0.0, is_causal,
                                                                       scale=scale)[:2]
    return out, lse[..., : query.shape[-2]]  # padded to a multiple of 32 along seq_q


_SDPA_BACKENDS = {
    # name: (SDPBackend, aten op returning the LSE, bias alignment, takes masks)
    "cudnn_sdpa": (SDPBackend.CUDNN_ATTENTION, _lse_cudnn, 8, True),
    "flash_sdpa": (SDPBackend.FLASH_ATTENTION, _lse_flash, 1, False),
    "efficient_sdpa": (SDPBackend.EFFICIENT_ATTENTION, _lse_efficient, 8, True),
}


def make_sdpa_kernel_fn(name: str):
    backend, lse_op, align, takes_mask = _SDPA_BACKENDS[name]

    def attention(query, key, value, *, attn_mask=None, is_causal=False, scale=None, return_lse=False):
        lq, lk = query.shape[-2], key.shape[-2]
        if attn_mask is not None and not takes_mask:
            raise ValueError(f"{name} does not take attention masks")
        if is_causal and (attn_mask is not None or lq != lk):
            if not takes_mask:
                raise ValueError(f"{name}: torch's flash kernel aligns causal attention top-left and refuses "
                                 f"seq_q != seq_k ({lq} vs {lk}); cachedit's causal is bottom-right")
            attn_mask, is_causal = _merge_causal(attn_mask, lq, lk, query.device), False
        # Rows with no key to attend to are cachedit's output 0 / LSE -inf whatever the kernel gives there
        # (cuDNN averages them under the -65504 bias; the mem-efficient LSE is undocumented there).
        empty = _empty_rows(attn_mask, lq)
        masked = CUDNN_MASKED if backend == SDPBackend.CUDNN_ATTENTION else float("-inf")
        if not return_lse:
            mask = _finite_mask(attn_mask, query.dtype) if masked != float("-inf") else attn_mask
            with torch.nn.attention.sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal,
                                                     scale=scale, enable_gqa=key.shape[1] != query.shape[1])
            return out if empty is None else out.masked_fill(empty.unsqueeze(-1), 0.0)
        key, value = _repeat_kv(query, key, value)
        out, lse = lse_op(query, key, value, _additive_bias(attn_mask, query, key, align, masked), is_causal, scale)
        lse = lse.float()
        if empty is not None:
            out, lse = out.masked_fill(empty.unsqueeze(-1), 0.0), lse.masked_fill(empty, float("-inf"))
        return out, lse

    attention.__name__ = f"{name}_attention"
    return attention


# -- FlashAttention-3 -----------------------------------------------------------------------------------
def make_fa3_kernel_fn(flash_attn_func):
    """Wrap `flash_attn_interface.flash_attn_func`; works with releases that return (out, lse) always
    and with those that return it only under `return_attn_probs=True`."""
    try:
        has_flag = "return_attn_probs" in inspect.signature(flash_attn_func).parameters
    except (TypeError, ValueError):
        has_flag = False

    def fa3_attention(query, key, value, *, attn_mask=None, is_causal=False, scale=None, return_lse=False):
        if attn_mask is not None:
            raise ValueError("fa3 does not take attention masks (FlashAttention-3 has causal and local windows only)")
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, H, D) views, unit last stride kept
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
        extra = {"return_attn_probs": True} if (return_lse and has_flag) else {}
        result = flash_attn_func(q, k, v, softmax_scale=scale, causal=bool(is_causal), **extra)
        out, lse = (result[0], result[1]) if isinstance(result, (tuple, list)) else (result, None)
        out = out.transpose(1, 2)
        if not return_lse:
            return out
        if lse is None:
            raise RuntimeError("flash_attn_func returned no softmax_lse")
        # Rows with no key to attend to: FlashAttention reports lse=+inf, cachedit's convention is -inf.
        lse = lse.float()
        return out, torch.where(lse == float("inf"), torch.full_like(lse, float("-inf")), lse)

    return fa3_attention


# -- what is offered on this machine ----------------------------------------------------------------------
def _fa3(caps):
    if not all_in(caps, (9, 0), (9, 9)):
        return None, f"FlashAttention-3 is offered on compute capability 9.x only; visible: {describe(caps)}"
    try:
        module = importlib.import_module("flash_attn_interface")
    except Exception as exc:  # not built, or its CUDA extension fails to load
        return None, (f"import flash_attn_interface failed ({type(exc).__name__}: {exc}); build it from the "
                      "flash-attention repository's hopper/ folder")
    fn = getattr(module, "flash_attn_func", None)
    if fn is None:
        return None, "flash_attn_interface has no flash_attn_func"
    return AttentionKernel(
        name="fa3", fn=make_fa3_kernel_fn(fn), dtypes=HALF, head_dims=(8, 256), head_dim_multiple=8,
        returns_lse=True, supports_mask=False, supports_causal=True, supports_gqa=True, priority=400,
        description="FlashAttention-3 (flash_attn_interface.flash_attn_func), Hopper",
    ), ""


CUDNN_PREFERRED_VERSION = 91500  # torch prefers cuDNN attention over flash from cuDNN 9.15 ...
CUDNN_PREFERRED_CAPS = {(9, 0), (10, 0)}  # ... on sm90 / sm100 (sdp_utils.cpp check_prefer_cudnn_attention)


def cudnn_preferred(version: int, caps) -> bool:
    """Whether torch itself would rank cuDNN attention above flash here."""
    return version >= CUDNN_PREFERRED_VERSION and bool(caps) and all(tuple(c) in CUDNN_PREFERRED_CAPS for c in caps)


def _cudnn(caps):
    if not torch.backends.cudnn.is_available():
        return None, "this torch build has no cuDNN"
    version = torch.backends.cudnn.version() or 0
    if version < 90000:
        return None, f"cuDNN SDPA needs cuDNN >= 9.0, found {version}"
    if not all_in(caps, (8, 0), (12, 1)):
        return None, f"cuDNN SDPA runs on sm_80..sm_121; visible: {describe(caps)}"
    preferred = cudnn_preferred(version, caps)
    return AttentionKernel(
        name="cudnn_sdpa", fn=make_sdpa_kernel_fn("cudnn_sdpa"), dtypes=HALF, head_dims=(8, 128),
        head_dim_multiple=8, returns_lse=True, supports_mask=True, supports_causal=True, supports_gqa=True,
        priority=300 if preferred else 150,
        description="torch SDPA, cuDNN backend" + ("" if preferred else " (ranked below flash: torch prefers "
                                                   "it only from cuDNN 9.15 on sm90/sm100)"),
    ), ""


def _flash(caps):
    if not torch.backends.cuda.is_flash_attention_available():
        return None, "this torch build has no flash attention kernel"
    if not all_in(caps, (8, 0), (12, 1)):
        return None, f"torch flash attention runs on sm_80..sm_121; visible: {describe(caps)}"
    return AttentionKernel(
        name="flash_sdpa", fn=make_sdpa_kernel_fn("flash_sdpa"), dtypes=HALF, head_dims=(8, 256),
        head_dim_multiple=8, returns_lse=True, supports_mask=False, supports_causal=True, supports_gqa=True,
        priority=200, description="torch SDPA, flash backend (FlashAttention-2)",
    ), ""


def _efficient(caps):
    if not all_in(caps, (5, 0), (12, 1)):
        return None, f"torch memory-efficient attention runs on sm_50..sm_121; visible: {describe(caps)}"
    dtypes = {torch.float32, torch.float16} | ({torch.bfloat16} if all_in(caps, (8, 0)) else set())
    return AttentionKernel(
        name="efficient_sdpa", fn=make_sdpa_kernel_fn("efficient_sdpa"), dtypes=frozenset(dtypes),
        head_dims=(8, 512), head_dim_multiple=8, returns_lse=True, supports_mask=True, supports_causal=True,
        supports_gqa=True, priority=100, description="torch SDPA, memory-efficient backend",
    ), ""


CANDIDATES = (("fa3", _fa3), ("cudnn_sdpa", _cudnn), ("flash_sdpa", _flash), ("efficient_sdpa", _efficient))


def offered_kernels(caps: list[tuple[int, int]]) -> tuple[list[AttentionKernel], dict[str, str]]:
    """The kernels whose run-time probe passes on devices with `caps`, and why each other one is left out."""
    kernels, reasons = [], {}
    for name, offer in CANDIDATES:
        kernel, why = offer(caps)
        if kernel is None:
            reasons[name] = why
        else:
            kernels.append(kernel)
    return kernels, reasons
