"""FP8 exchanges: per-token float8_e4m3fn with a per-token scale, packed into one byte tensor.

A (..., D) tensor becomes (..., D + 4) uint8: D float8 codes of x / s followed by the 4 bytes of the
float32 scale s = amax(|x|) / 448 of that token (the last dim). One exchange carries both, so the
scale always travels with its token whatever the all-to-all does to the other dims. Relative
error per element is at most 2^-4 of the token's amax (e4m3 keeps 3 mantissa bits).
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_TINY = torch.finfo(torch.float32).tiny


def pack(x: torch.Tensor) -> torch.Tensor:
    """(..., D) float tensor -> (..., D + 4) uint8 (codes, then the float32 scale's bytes)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_TINY) / FP8_MAX
    codes = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)
    return torch.cat([codes, scale.contiguous().view(torch.uint8)], dim=-1)


def unpack(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `pack`: (..., D + 4) uint8 -> (..., D) of `dtype`."""
    codes, scale = packed[..., :-4], packed[..., -4:]
    scale = scale.contiguous().view(torch.float32)
    return (codes.contiguous().view(FP8).float() * scale).to(dtype)
