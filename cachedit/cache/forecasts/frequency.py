"""FreqCa (arXiv 2510.08669): frequency-split forecasting of one cached residual.

The paper observes that a DiT feature's low spatial frequencies (layout) change little between
steps but not smoothly, while its high frequencies (detail) change a lot but smoothly: so the
low band is reused and the high band is forecast (the paper: second-order Hermite; here HiCache
of order 2 over timestep distances). What is cached is the cumulative residual of the skipped
blocks, one tensor per stream, as everywhere in cachedit. The split is an FFT over the token
grid: 2-D when the token count is a square (image tokens of a square latent), 1-D over tokens
otherwise (text tokens, other aspect ratios); the low band is the radial frequencies up to
`cutoff` of the highest. `FreqCaLow` is the reverse split (low forecast, high reused), for
comparison. Under context parallelism a block's tokens are sharded, and the split is over the
local shard's tokens, not the whole grid.
"""

from __future__ import annotations

import math

import torch

from ..calibrators import Calibrator
from .hermite import HiCache


def _low_mask(shape: tuple[int, ...], cutoff: float, device) -> torch.Tensor:
    axes = [torch.fft.fftfreq(n, device=device).abs() / 0.5 for n in shape]  # 0 .. 1 (Nyquist) per axis
    grids = torch.meshgrid(*axes, indexing="ij")
    radius = torch.sqrt(sum(g * g for g in grids)) if len(grids) > 1 else grids[0]
    return (radius <= cutoff).float()


def low_pass(value: torch.Tensor, cutoff: float) -> torch.Tensor:
    """The low-frequency part of `value` (..., tokens, channels) over its token grid."""
    n = value.shape[-2]
    side = math.isqrt(n)
    x = value.float()
    if side * side == n and side > 1:
        x = x.reshape(*x.shape[:-2], side, side, x.shape[-1])
        spectrum = torch.fft.fft2(x, dim=(-3, -2))
        mask = _low_mask((side, side), cutoff, x.device)[..., None]
        low = torch.fft.ifft2(spectrum * mask, dim=(-3, -2)).real.reshape(value.shape)
    else:
        spectrum = torch.fft.fft(x, dim=-2)
        low = torch.fft.ifft(spectrum * _low_mask((n,), cutoff, x.device)[:, None], dim=-2).real
    return low.to(value.dtype)


class FreqCa(Calibrator):
    """Low band reused from the last computed step, high band forecast (scaled Hermite, order 2)."""

    clock = "timestep"
    cutoff = 0.25
    forecast_band = "high"

    def __init__(self) -> None:
        super().__init__()
        self.reused, self.forecast = Calibrator(), HiCache(order=2)

    @property
    def position_of(self):
        return self.forecast.position_of

    @position_of.setter
    def position_of(self, fn) -> None:
        self.forecast.position_of = fn

    def update(self, step: int, value: torch.Tensor) -> None:
        low = low_pass(value, self.cutoff)
        high = value - low
        forecast, reused = (high, low) if self.forecast_band == "high" else (low, high)
        self.forecast.update(step, forecast)
        self.reused.update(step, reused)
        self.last = value

    def predict(self, step: int) -> torch.Tensor:
        return self.reused.predict(step) + self.forecast.predict(step)


class FreqCaLow(FreqCa):
    """The reverse split: low band forecast, high band reused."""

    forecast_band = "low"
