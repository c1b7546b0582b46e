"""Cache policies: which signal decides that a step's cacheable blocks are skipped.

Every policy is consulted at the entry of the first cacheable block, after the step's common
limits (warmup, step masks, max cached / continuous steps) allowed a skip, and sees a `Probe` of
the step. What stands in for skipped blocks is the same for all: their residual from the last
computed step, or a calibrator's forecast of it. A policy keeps its memory in the per-context
`CallState.memo` dict, so CFG branches and pipeline calls never share it. Adding a policy is one
class and one `POLICIES.register(cls.name, cls)` call; nothing else changes. A policy whose options
are fitted from uncached runs (TeaCache's polynomial, MagCache's ratios) says how in `fit`.

- dbcache:   relative L1 change of the first Fn blocks' residual since the last computed step.
- teacache:  relative L1 change of the first block's timestep-modulated input between consecutive
             steps, rescaled by a per-model polynomial and accumulated until it crosses the threshold
             (TeaCache, arXiv 2411.19108); first and last steps computed.
- magcache:  per-step residual magnitude ratios calibrated once; the accumulated error of reusing
             the residual, sum |1 - prod ratios|, must stay under the threshold, with at most K
             consecutive skips; the first steps computed (MagCache, arXiv 2506.09045).
- easycache: no calibration: the transformation rate k = |d output| / |d input| measured between
             computed steps predicts the output change from the input change, accumulated until it
             crosses the threshold (EasyCache, arXiv 2507.02860).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from ..registry import Registry

# TeaCache's published FLUX.1 rescaling polynomial (highest power first), from the TeaCache repository.
TEACACHE_FLUX_COEFFICIENTS = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)


@dataclass
class Probe:
    """What a policy may look at when deciding a step."""

    hidden_in: torch.Tensor  # the stack's input
    hidden: torch.Tensor  # the input of the first cacheable block (after the Fn blocks)
    modulated: torch.Tensor | None  # the first block's timestep-modulated input, where the adapter provides it


def _option_error(policy: str, name: str, value, allowed: str) -> ValueError:
    return ValueError(f"CacheConfig.policy_options[{name!r}]={value!r:.80} is invalid for policy {policy!r}; "
                      f"allowed values: {allowed}")


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def finite_numbers(policy: str, name: str, value, positive: bool = False) -> tuple[float, ...]:
    """A policy option that is a non-empty sequence of finite numbers (> 0 when `positive`), checked when
    the config is built."""
    allowed = f"a non-empty list of finite numbers{' > 0' if positive else ''}"
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__") or not len(value):
        raise _option_error(policy, name, value, allowed)
    if not all(_real(v) and (not positive or v > 0) for v in value):
        raise _option_error(policy, name, value, allowed)
    return tuple(float(v) for v in value)


def finite_number(policy: str, name: str, value, low: float = 0.0, high: float = math.inf) -> float:
    if not _real(value) or not low <= value <= high:
        raise _option_error(policy, name, value, f"a finite number in [{low}, {high}]")
    return float(value)


def whole_number(policy: str, name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise _option_error(policy, name, value, f"an integer >= {low}")
    return int(value)


class Policy:
    name = "abstract"
    needs_modulated_input = False
    tune_thresholds: tuple[float, ...] = ()  # what `cachedit tune` tries; empty: not searched
    tune_Fn = 0  # the first blocks the tuner computes (1 where the signal is the first blocks' residual)
    # fit(recorded) -> policy_options from uncached runs (cachedit.cache.calibrate); None: nothing to fit
    fit = None
    tune_calibrators: tuple | None = None  # the calibrators `cachedit tune` crosses it with (None: every one)

    @classmethod
    def tune_space(cls) -> list[dict]:
        """The CacheConfig fields `cachedit tune` tries for this policy (crossed with every calibrator)."""
        return [dict(Fn=cls.tune_Fn, Bn=0, residual_diff_threshold=t, warmup_steps=3) for t in cls.tune_thresholds]

    def __init__(self, **options) -> None:
        if options:
            raise ValueError(f"CacheConfig.policy_options: policy {self.name!r} takes no options, got {sorted(options)}")

    def observe(self, cache, st, probe: Probe) -> None:
        """Called at every step, before any decision (the limits may force this step to compute)."""

    def skip(self, cache, st, probe: Probe) -> bool:
        """True: skip the cacheable blocks this step (the limits already allowed it)."""
        raise NotImplementedError

    def computed(self, cache, st, probe: Probe, output: torch.Tensor) -> None:
        """The step computed; `output` is the last cacheable block's hidden output."""

    def check_config(self, config) -> None:
        """Raise ValueError when this policy cannot run with `config` (called when the config is built)."""


class DBCache(Policy):
    name = "dbcache"
    tune_thresholds = (0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.45, 0.7)
    tune_Fn = 1

    @classmethod
    def tune_space(cls) -> list[dict]:
        masks = [dict(Fn=1, Bn=0, residual_diff_threshold=0, warmup_steps=0, steps_mask=m, mask_mode="static")
                 for m in ("medium", "fast", "ultra")]
        return super().tune_space() + masks

    def check_config(self, config) -> None:
        if config.Fn < 1:
            raise ValueError("CacheConfig.Fn=0 is invalid for policy 'dbcache' (its signal is the first blocks' "
                             "residual); allowed values: an integer >= 1")

    def skip(self, cache, st, probe):
        return cache.similar(st, st.memo.get("fn_residual"), probe.hidden - probe.hidden_in)

    def computed(self, cache, st, probe, output):
        st.memo["fn_residual"] = probe.hidden - probe.hidden_in


def _relative_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().mean() / a.float().abs().mean()).item()


def teacache_coefficients(recorded: list[list[dict]], degree: int = 4) -> list[float]:
    """Fit output-residual change as a polynomial of modulated-input change, over consecutive steps."""
    xs, ys = [], []
    for steps in recorded:
        for prev, cur in zip(steps, steps[1:]):
            if prev["modulated"].shape != cur["modulated"].shape:
                continue
            xs.append(_relative_l1(prev["modulated"], cur["modulated"]))
            ys.append(_relative_l1(prev["output"] - prev["input"], cur["output"] - cur["input"]))
    if len(xs) <= degree:
        raise ValueError(f"teacache calibration needs more than {degree} step pairs, recorded {len(xs)}")
    return [float(c) for c in np.polyfit(xs, ys, degree)]


def mag_ratios(recorded: list[list[dict]]) -> list[float]:
    """Mean over tokens of |residual_t| / |residual_t-1|, averaged over runs; 1.0 for the first step."""
    per_run = []
    for steps in recorded:
        residuals = [s["output"].float() - s["input"].float() for s in steps]
        ratios = [1.0] + [(cur.norm(dim=-1) / (prev.norm(dim=-1) + 1e-8)).mean().item()
                          for prev, cur in zip(residuals, residuals[1:])]
        per_run.append(ratios)
    length = min(len(r) for r in per_run)
    return [float(np.mean([r[i] for r in per_run])) for i in range(length)]


def _first_last(st) -> bool:
    return st.step == 0 or (st.num_steps is not None and st.step >= st.num_steps - 1)


class TeaCache(Policy):
    name = "teacache"
    needs_modulated_input = True
    tune_thresholds = (0.2, 0.4, 0.7, 1.0, 1.5, 2.5)

    def __init__(self, coefficients=None) -> None:
        self.coefficients = None if coefficients is None else finite_numbers(self.name, "coefficients", coefficients)

    @classmethod
    def fit(cls, recorded: list[list[dict]]) -> dict:
        return {"coefficients": teacache_coefficients(recorded)}

    def observe(self, cache, st, probe):
        signal = probe.modulated if probe.modulated is not None else probe.hidden_in
        prev, st.memo["prev_input"] = st.memo.get("prev_input"), signal
        st.memo["change"] = cache.relative_l1(prev, signal) if prev is not None and prev.shape == signal.shape else None

    def skip(self, cache, st, probe):
        change = st.memo["change"]
        if change is None or _first_last(st):
            return False
        rescaled = float(np.polyval(self.coefficients, change)) if self.coefficients else change
        st.diffs.setdefault(st.step, rescaled)
        st.memo["accumulated"] = st.memo.get("accumulated", 0.0) + rescaled
        return st.memo["accumulated"] < st.threshold

    def computed(self, cache, st, probe, output):
        st.memo["accumulated"] = 0.0


class MagCache(Policy):
    name = "magcache"
    tune_thresholds = (0.05, 0.1, 0.2, 0.4, 0.8)

    @classmethod
    def tune_space(cls) -> list[dict]:
        return [{**space, "policy_options": {"max_skip_steps": 5}} for space in super().tune_space()]

    def __init__(self, mag_ratios=None, max_skip_steps: int = 3, retention_ratio: float = 0.2) -> None:
        if mag_ratios is None:
            raise ValueError("CacheConfig.policy_options['mag_ratios'] is required for policy 'magcache': calibrate "
                             "them once with `cachedit calibrate --policy magcache` (or cachedit.cache.calibrate)")
        self.mag_ratios = np.asarray(finite_numbers(self.name, "mag_ratios", mag_ratios, positive=True))
        self.max_skip_steps = whole_number(self.name, "max_skip_steps", max_skip_steps, 1)
        self.retention_ratio = finite_number(self.name, "retention_ratio", retention_ratio, 0.0, 1.0)

    @classmethod
    def fit(cls, recorded: list[list[dict]]) -> dict:
        return {"mag_ratios": mag_ratios(recorded)}

    def ratio(self, step: int, num_steps: int | None) -> float:
        """The calibrated ratio at `step`, interpolated when the step count differs from the calibration's."""
        n = len(self.mag_ratios)
        if not num_steps or num_steps == n:
            return float(self.mag_ratios[min(step, n - 1)])
        return float(np.interp(step / max(1, num_steps - 1) * (n - 1), np.arange(n), self.mag_ratios))

    def skip(self, cache, st, probe):
        if st.num_steps is not None and st.step < round(self.retention_ratio * st.num_steps) or _first_last(st):
            return False
        m = st.memo
        m["ratio"] = m.get("ratio", 1.0) * self.ratio(st.step, st.num_steps)
        m["skips"] = m.get("skips", 0) + 1
        m["error"] = m.get("error", 0.0) + abs(1.0 - m["ratio"])
        st.diffs.setdefault(st.step, m["error"])
        return m["error"] < st.threshold and m["skips"] <= self.max_skip_steps

    def computed(self, cache, st, probe, output):
        st.memo.update(ratio=1.0, skips=0, error=0.0)


class EasyCache(Policy):
    name = "easycache"
    tune_thresholds = (0.1, 0.2, 0.4, 0.8, 1.5)

    def skip(self, cache, st, probe):
        m = st.memo
        if "rate" not in m or _first_last(st):
            return False
        input_change = cache.relative_l1(m["last_input"], probe.hidden_in)
        m["accumulated"] = m.get("accumulated", 0.0) + m["rate"] * input_change
        st.diffs.setdefault(st.step, m["accumulated"])
        return m["accumulated"] < st.threshold

    def computed(self, cache, st, probe, output):
        m = st.memo
        if "last_output" in m and m["last_output"].shape == output.shape:
            input_change = cache.relative_l1(m["last_input"], probe.hidden_in)
            output_change = cache.relative_l1(m["last_output"], output)
            m["rate"] = output_change / max(input_change, 1e-8)
        m.update(last_input=probe.hidden_in, last_output=output, accumulated=0.0)


class Forecast(Policy):
    """cachedit's own policy: skip while the cheap signal stays *predictable*, not merely small.

    DBCache asks "did the first blocks' residual change little since the last computed step?";
    a trajectory can change a lot yet smoothly, and a calibrator then forecasts the skipped blocks
    well, or change little yet turn, and reuse goes wrong. Here a Taylor forecast of the first
    blocks' residual, fitted on computed steps, is checked against the residual those blocks
    actually produce at this step: the relative forecast error is the evidence that the skipped
    blocks' forecast (the config's calibrator, TaylorSeer by default) holds too. Errors accumulate
    over consecutive skips into a budget (the threshold), spent faster late in the schedule where
    fine detail forms (weight 1 + late_weight * progress).
    """

    name = "forecast"
    tune_thresholds = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
    tune_Fn = 1

    def __init__(self, order: int = 1, late_weight: float = 1.0) -> None:
        self.order = whole_number(self.name, "order", order, 1)
        self.late_weight = finite_number(self.name, "late_weight", late_weight)

    def check_config(self, config) -> None:
        if config.Fn < 1:
            raise ValueError("CacheConfig.Fn=0 is invalid for policy 'forecast' (its signal is the first blocks' "
                             "residual); allowed values: an integer >= 1")

    def skip(self, cache, st, probe):
        from .calibrators import TaylorSeer

        seer = st.memo.setdefault("seer", TaylorSeer(self.order))
        if len(seer.derivatives) <= self.order or _first_last(st):
            return False  # not enough computed steps to forecast with this order yet
        actual = probe.hidden - probe.hidden_in
        predicted = seer.predict(st.step)
        if predicted.shape != actual.shape:
            return False
        error = cache.relative_l1(actual, predicted)
        progress = st.step / max(1, (st.num_steps or st.step + 1) - 1)
        st.memo["spent"] = st.memo.get("spent", 0.0) + error * (1.0 + self.late_weight * progress)
        st.diffs.setdefault(st.step, st.memo["spent"])
        return st.memo["spent"] < st.threshold

    def computed(self, cache, st, probe, output):
        from .calibrators import TaylorSeer

        st.memo.setdefault("seer", TaylorSeer(self.order)).update(st.step, probe.hidden - probe.hidden_in)
        st.memo["spent"] = 0.0


def _check_policy(name: str, cls) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Policy)) or cls.name in ("abstract", ""):
        raise TypeError(f"cache policy {name!r} must be a cachedit.cache.policies.Policy subclass with its own `name`")


# Policy name (CacheConfig.policy) -> its class.
POLICIES: Registry[type[Policy]] = Registry("cache policy", check=_check_policy)
for _cls in (DBCache, TeaCache, MagCache, EasyCache, Forecast):
    POLICIES.register(_cls.name, _cls)


def register_policy(cls: type[Policy]) -> None:  # the old spelling, kept for existing callers
    POLICIES.register(cls.name, cls)


def calibrated_policies() -> list[str]:
    """The registered policies whose options are fitted from runs (`cachedit calibrate --policy`)."""
    return [name for name, cls in POLICIES.items() if cls.fit is not None]


def make_policy(name: str, options: dict) -> Policy:
    try:
        return POLICIES.get(name)(**options)
    except TypeError as exc:
        raise ValueError(f"CacheConfig.policy_options={options} do not fit policy {name!r}: {exc}") from None
