"""Calibrators forecast a skipped residual from the residuals of computed steps.

A calibrator is a small class with `update(step, value)` (a computed step's true value) and
`predict(step)` (the forecast for a skipped step). Steps are the denoising step indices, so
uneven gaps between computed steps are handled exactly. A class builds itself from the cache
config (`create`); register a new one with `CALIBRATORS.register(name, cls)`. `calibrator=None` is
the plain reuse of the base `Calibrator`, which is not registered.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..registry import Registry

if TYPE_CHECKING:
    from ..config import CacheConfig


class Calibrator:
    """Reuse: the forecast is the last computed value (plain DBCache)."""

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None

    @classmethod
    def create(cls, config: CacheConfig) -> Calibrator:
        """One calibrator for `config` (the default takes nothing from it)."""
        return cls()

    def update(self, step: int, value: torch.Tensor) -> None:
        self.last = value

    def predict(self, step: int) -> torch.Tensor:
        return self.last


class TaylorSeer(Calibrator):
    """Taylor expansion around the last computed step, derivatives by finite differences over
    the actual gaps between computed steps (TaylorSeer, arXiv 2503.06923)."""

    def __init__(self, order: int = 1) -> None:
        super().__init__()
        self.order = order
        self.anchor: int | None = None
        self.derivatives: list[torch.Tensor] = []

    @classmethod
    def create(cls, config: CacheConfig) -> TaylorSeer:
        return cls(config.taylorseer_order)

    def update(self, step: int, value: torch.Tensor) -> None:
        new = [value]
        if self.anchor is not None and step > self.anchor:
            gap = step - self.anchor
            for old in self.derivatives[: self.order]:
                new.append((new[-1] - old) / gap)
        self.derivatives, self.anchor, self.last = new, step, value

    def predict(self, step: int) -> torch.Tensor:
        dt = step - self.anchor
        out = self.derivatives[0]
        for i, d in enumerate(self.derivatives[1:], start=1):
            out = out + d * (dt ** i / math.factorial(i))
        return out


class FoCa(Calibrator):
    """Forecast then calibrate (FoCa, arXiv 2508.16211): a linear multistep predictor over the two
    latest points, computed or forecast, corrected by the trapezoidal (Heun) rule anchored at the
    last computed step. Gaps are real step distances; beyond `horizon` steps the forecast is
    damped toward the anchor, where a linear model of the trajectory stops holding."""

    def __init__(self, horizon: float = 3.0) -> None:
        super().__init__()
        self.horizon = horizon
        self.points: list[tuple[int, torch.Tensor]] = []  # latest two (step, value), forecasts included
        self.anchors: list[tuple[int, torch.Tensor]] = []  # latest two computed (step, value)

    def update(self, step: int, value: torch.Tensor) -> None:
        self.anchors = (self.anchors + [(step, value)])[-2:]
        self.points = (self.points + [(step, value)])[-2:]
        self.last = value

    def predict(self, step: int) -> torch.Tensor:
        (a, fa) = self.anchors[-1]
        if len(self.anchors) < 2 or len(self.points) < 2:
            return fa
        (a0, fa0), ((k0, f0), (k1, f1)) = self.anchors[0], self.points
        slope_anchor = (fa - fa0) / (a - a0)
        predicted = f1 + (step - k1) * (f1 - f0) / (k1 - k0)  # predictor: linear multistep
        slope_local = (predicted - f1) / (step - k1)
        elapsed = step - a
        reach = min(elapsed, self.horizon)
        corrected = fa + (reach / 2.0) * (slope_anchor + slope_local)  # corrector: trapezoid from the anchor
        if elapsed > self.horizon:
            w = self.horizon / elapsed
            corrected = w * corrected + (1 - w) * fa
        self.points = [(k1, f1), (step, corrected)]
        return corrected


def _check_calibrator(name: str, cls) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Calibrator)):
        raise TypeError(f"calibrator {name!r} must be a cachedit.cache.Calibrator subclass")


# Calibrator name (CacheConfig.calibrator) -> its class.
CALIBRATORS: Registry[type[Calibrator]] = Registry("calibrator", check=_check_calibrator)
CALIBRATORS.register("taylorseer", TaylorSeer)
CALIBRATORS.register("foca", FoCa)

register_calibrator = CALIBRATORS.register  # the old spelling, kept for existing callers


def make_calibrator(config: CacheConfig | None) -> Calibrator:
    """The calibrator `config.calibrator` names, built by its class from `config` (None: plain reuse)."""
    if config is None or config.calibrator is None:
        return Calibrator()
    return CALIBRATORS.get(config.calibrator).create(config)
