"""Polynomial forecasts over the real timestep distance between computed steps, with a stability guard.

TaylorSeer (calibrators.py) measures distance in step counts and differences each derivative
against the previous one over the last gap only. With a shifted or otherwise uneven sigma
schedule (FLUX.1-dev's dynamic shift, SD3's shift 3) equal step gaps are unequal distances along
the trajectory, and even on an even grid its first derivative lags by f''/2 per gap. Here the
distance is the transformer's own `timestep` argument at each step (dbcache records it per step
as a tensor view, so no host read is added), and the coefficients are Newton divided differences
over the last order+1 computed steps: the forecast is their interpolating polynomial, exact on
polynomials of its order at any spacing. Without a recorded timestep the step index stands in.
Measured on the reference model (bench/sweep_forecasts.py), neither helped: under a shift-3
schedule TaylorSeer's step counts beat timestep distances by 0.5-1.5 dB, and its lagging
differences beat the exact Newton ones at skips of 3 or more steps. Kept as options, not defaults.

Orders above 1 extrapolate well over short skips and blow up over long ones. The guard drops a
term whose norm exceeds `term_ratio` times the norm of the change the lower terms forecast, and
falls back to first order when the forecast change exceeds `change_factor` times the last observed
change (scaled by the skip length). Both are tensor selections, never host reads. Norms are over
the whole tensor: a turning point shared by every channel (the linear term vanishing) also drops
the higher terms there, which a real feature map, with many channels, rarely has. Under context
parallelism the norms are each rank's own (not reduced): shards may keep different orders.
"""

from __future__ import annotations

import math

import torch

from ..calibrators import Calibrator


def _norm(t: torch.Tensor) -> torch.Tensor:
    return t.float().norm()


class TimedTaylor(Calibrator):
    """Newton-form polynomial through the last order+1 computed steps, over timestep distances;
    orders above 1 guarded. `derivatives[k]` is the divided difference f[t0..tk] (t0 the latest),
    which estimates the k-th derivative / k!."""

    clock = "timestep"  # state.py hands it `position_of(step)`: the recorded timestep of a step
    newton = True  # False: TaylorSeer's scheme (TimedTaylorSeer)

    def __init__(self, order: int = 1, guard: bool = True, term_ratio: float = 4.0, change_factor: float = 2.0):
        super().__init__()
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ValueError(f"{type(self).__name__}.order={order!r} is invalid; allowed values: an integer >= 1")
        self.order, self.guard = order, guard
        self.term_ratio, self.change_factor = term_ratio, change_factor
        self.position_of = None
        self.anchor: int | None = None  # the last computed step
        self.anchor_at = None  # its position
        self.unit = None  # timestep distance per denoising step between the last two computed steps
        self.observed = None  # norm of the last observed change between computed steps, and its distance
        self.derivatives: list[torch.Tensor] = []
        self.nodes: list = []  # positions of the computed steps the differences span, latest first
        self.used_order = None  # the order the last forecast used (a tensor once guarded): for reports and tests

    @classmethod
    def create(cls, config) -> TimedTaylor:
        return cls(config.taylorseer_order)

    def position(self, step: int):
        at = self.position_of(step) if self.position_of is not None else None
        if at is None:
            return float(step)
        return at.float() if isinstance(at, torch.Tensor) else float(at)

    def update(self, step: int, value: torch.Tensor) -> None:
        at = self.position(step)
        new = [value]
        nodes = [at]
        if self.anchor is not None and step > self.anchor:
            gap = at - self.anchor_at
            for old, node in zip(self.derivatives[: self.order], self.nodes):
                new.append((new[-1] - old) / ((at - node) if self.newton else gap))
            nodes += self.nodes[: self.order]
            self.unit = gap / (step - self.anchor)
            self.observed = (_norm(value - self.last), gap)
        self.derivatives, self.nodes, self.anchor, self.anchor_at, self.last = new, nodes, step, at, value

    def coefficients(self) -> list[torch.Tensor]:
        """Estimates of f^(k) / k! at the anchor, k = 0.. (the Taylor coefficients)."""
        if self.newton:
            return list(self.derivatives)
        return [d / math.factorial(k) for k, d in enumerate(self.derivatives)]

    def terms(self, t) -> list[torch.Tensor]:
        """The expansion's terms of order 1.. at position `t`."""
        if not self.newton:
            dt = t - self.anchor_at
            return [d * (dt ** i / math.factorial(i)) for i, d in enumerate(self.derivatives[1:], start=1)]
        out, product = [], 1.0
        for d, node in zip(self.derivatives[1:], self.nodes):
            product = product * (t - node)
            out.append(d * product)
        return out

    def predict(self, step: int) -> torch.Tensor:
        t = self.position(step)
        dt = t - self.anchor_at
        terms = self.terms(t)
        out = self.derivatives[0]
        if not terms:
            return out
        change = terms[0]
        if not self.guard or len(terms) == 1:
            self.used_order = len(terms)
            return out + sum(terms)
        keep = torch.ones((), device=change.device)
        used = torch.ones((), device=change.device)
        for term in terms[1:]:
            keep = keep * (_norm(term) <= self.term_ratio * _norm(change)).float()
            change = change + term * keep.to(term.dtype)
            used = used + keep
        if self.observed is not None:
            seen, gap = self.observed
            reach = torch.clamp(torch.as_tensor(abs(dt / gap), device=change.device), min=1.0)
            bounded = (_norm(change) <= self.change_factor * seen * reach)
            change = torch.where(bounded, change, terms[0])
            used = torch.where(bounded, used, torch.ones_like(used))
        self.used_order = used
        return out + change


class TimedTaylorSeer(TimedTaylor):
    """TaylorSeer's scheme over timestep distances: each difference taken over the last gap only,
    Taylor terms dt^i / i!. Its higher derivatives lag (D1 by f''/2 per gap), so it is exact on
    lines only, but the lag damps long extrapolations. Equal to TaylorSeer when the timesteps are
    evenly spaced (as on a shift-1 flow-matching schedule), up to rounding; guarded likewise."""

    newton = False
