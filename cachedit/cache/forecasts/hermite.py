"""HiCache (arXiv 2508.16984): the Taylor forecast with its monomial basis replaced by scaled Hermite
polynomials.

The derivative estimates are TimedTaylor's divided differences (c_i = f[t0..ti] ~ f^(i) / i!); the
Taylor term of order i, c_i (u x)^i (x: the distance from the anchor in denoising steps, u the
timestep distance per step), becomes c_i u^i H~_i(x) with the dual-scaled
physicists' Hermite polynomial H~_i(x) = sigma^i H_i(sigma x). Its lower-degree parts pull a
higher-order term back near the anchor and damp it less than a monomial grows far from it; the
output scale sigma^i contracts high orders. sigma = 1/sqrt(2) (the default) gives the
probabilists' He_i: He_1(x) = x, so first order equals Taylor's and the basis differs from order 2
on (He_2 = x^2 - 1). Distances are timestep distances, measured in units of the timestep
distance per step between the last two computed steps (the paper's x is a step count).
"""

from __future__ import annotations

import math

import torch

from .taylor import TimedTaylor


def scaled_hermite(n: int, x, sigma: float):
    """[H~_0(x), ..., H~_n(x)], H~_i(x) = sigma^i H_i(sigma x), H_i the physicists' Hermite polynomials."""
    y = x * sigma
    values = [torch.ones_like(y) if isinstance(y, torch.Tensor) else 1.0, 2 * y]
    for k in range(1, n):
        values.append(2 * y * values[k] - 2 * k * values[k - 1])
    return [v * sigma ** i for i, v in enumerate(values[: n + 1])]


class HiCache(TimedTaylor):
    """Scaled-Hermite forecast over timestep distances; guarded like TimedTaylor. Order 2 by default
    (`CacheConfig.taylorseer_order` sets it; order 1 is Taylor's first order scaled by 2 sigma^2)."""

    sigma = 1 / math.sqrt(2)

    def terms(self, t) -> list[torch.Tensor]:
        if self.unit is None:
            return []
        x = (t - self.anchor_at) / self.unit
        coefficients = self.coefficients()
        basis = scaled_hermite(len(coefficients) - 1, x, self.sigma)
        return [c * (self.unit ** i * basis[i]) for i, c in enumerate(coefficients[1:], start=1)]
