"""Calibrators forecast a skipped residual from the residuals of computed steps.

A calibrator is a small class with `update(step, value)` (a computed step's true value) and
`predict(step)` (the forecast for a skipped step). Steps are the denoising step indices, so
uneven gaps between computed steps are handled exactly. Register a new one in `CALIBRATORS`.
"""

from __future__ import annotations

import math

import torch


class Calibrator:
    """Reuse: the forecast is the last computed value (plain DBCache)."""

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None

    def update(self, step: int, value: torch.Tensor) -> None:
        self.last = value

    def predict(self, step: int) -> torch.Tensor:
        return self.last


class TaylorSeer(Calibrator):
    """Taylor expansion around the last computed step, derivatives by finite differences over
    the actual gaps between computed steps (TaylorSeer, arXiv 2503.06923)."""

    takes_order = True  # built with CacheConfig.taylorseer_order

    def __init__(self, order: int = 1) -> None:
        super().__init__()
        self.order = order
        self.anchor: int | None = None
        self.derivatives: list[torch.Tensor] = []

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


CALIBRATORS: dict[str | None, type[Calibrator]] = {None: Calibrator, "taylorseer": TaylorSeer, "foca": FoCa}


def register_calibrator(name: str, cls: type[Calibrator]) -> None:
    """Make `CacheConfig(calibrator=name)` use `cls` (a Calibrator subclass constructible with no arguments)."""
    if not (isinstance(cls, type) and issubclass(cls, Calibrator)):
        raise TypeError(f"register_calibrator({name!r}, ...) needs a cachedit.cache.Calibrator subclass")
    CALIBRATORS[name] = cls


def make_calibrator(name: str | None, order: int = 1) -> Calibrator:
    cls = CALIBRATORS[name]
    return cls(order) if getattr(cls, "takes_order", False) else cls()
