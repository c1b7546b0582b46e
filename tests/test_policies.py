"""Cache policies beyond DBCache: TeaCache, MagCache, EasyCache, calibration, and user policies."""

from __future__ import annotations

import pytest
import torch

import cachedit
from cachedit.cache.calibrate import calibrate
from cachedit.cache.policies import POLICIES, TEACACHE_FLUX_COEFFICIENTS, Policy, register_policy
from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

STEPS = 12
EXACT = dict(device="cpu_ref", attention="torch_sdpa")
FLAT_RATIOS = [1.0] + [0.98] * (STEPS - 1)
POLICY_CASES = {
    "teacache": ({}, 0.3),
    "teacache-flux": ({"coefficients": TEACACHE_FLUX_COEFFICIENTS}, 0.6),
    "magcache": ({"mag_ratios": FLAT_RATIOS, "max_skip_steps": 2}, 0.2),
    "easycache": ({}, 0.5),
}


def _run(pipe, family, steps=STEPS):
    return pipe(prompt="a photo of a cat", **tiny_call_kwargs(family, num_inference_steps=steps))[0]


def _contexts(pipe):
    return cachedit.summary(pipe)["cache"]["transformer"]["stacks"][0]["contexts"]


@pytest.mark.parametrize("family", ["flux", "wan", "sd3"])
@pytest.mark.parametrize("case", list(POLICY_CASES))
def test_policy_caches_on_three_families_and_threshold_zero_is_exact(family, case):
    options, threshold = POLICY_CASES[case]
    policy = case.split("-")[0]
    pipe = tiny_pipeline(family)
    base = _run(pipe, family)
    cachedit.accelerate(pipe, **EXACT, cache=dict(Fn=0, residual_diff_threshold=0, warmup_steps=0, policy=policy,
                                                  policy_options=options))
    assert torch.equal(_run(pipe, family), base)
    cachedit.disable(pipe)
    cachedit.accelerate(pipe, **EXACT, cache=dict(Fn=0, residual_diff_threshold=threshold, warmup_steps=0,
                                                  policy=policy, policy_options=options))
    out = _run(pipe, family)
    for report in _contexts(pipe).values():
        cached = report["cached_steps"]
        assert cached, f"{policy} cached nothing on {family}"
        assert 0 not in cached and STEPS - 1 not in cached, "first and last steps always compute"
        if policy == "magcache":
            assert all(s >= round(0.2 * STEPS) for s in cached), "retention steps compute"
            longest = run = 0
            for prev, cur in zip([None] + cached, cached):
                run = run + 1 if prev is not None and cur == prev + 1 else 1
                longest = max(longest, run)
            assert longest <= 2, "max_skip_steps=2 consecutive skips"
    assert torch.isfinite(out).all() and not torch.equal(out, base)


def test_teacache_accumulates_rescaled_change_until_threshold():
    pipe = tiny_pipeline("flux")
    cachedit.accelerate(pipe, **EXACT, cache=dict(Fn=0, residual_diff_threshold=0.6, warmup_steps=0,
                                                  policy="teacache",
                                                  policy_options={"coefficients": TEACACHE_FLUX_COEFFICIENTS}))
    _run(pipe, "flux")
    report = _contexts(pipe)["cond"]
    # Each skipped step's accumulated (rescaled) change stayed under the threshold.
    assert report["cached_steps"] and all(report["residual_diffs"][s] < 0.6 for s in report["cached_steps"])


def test_calibration_fits_teacache_and_magcache_and_the_result_runs():
    pipe = tiny_pipeline("flux")
    runs = [dict(prompt=p, **tiny_call_kwargs("flux", num_inference_steps=STEPS, seed=i))
            for i, p in enumerate(["a cat", "a red dog"])]
    tea = calibrate(pipe, "teacache", runs)
    mag = calibrate(pipe, "magcache", runs)
    assert len(tea["coefficients"]) == 5 and all(map(torch.isfinite, map(torch.tensor, tea["coefficients"])))
    assert len(mag["mag_ratios"]) == STEPS and mag["mag_ratios"][0] == 1.0
    assert all(0.5 < r < 2.0 for r in mag["mag_ratios"])
    cachedit.accelerate(pipe, **EXACT, cache=dict(Fn=0, residual_diff_threshold=0.3, warmup_steps=0,
                                                  policy="magcache", policy_options=mag))
    assert torch.isfinite(_run(pipe, "flux")).all() and _contexts(pipe)["cond"]["cached_steps"]
    with pytest.raises(ValueError, match="policy='easycache' needs no calibration"):
        calibrate(pipe, "easycache", runs)


def test_user_policy_plugs_in():
    class EveryOther(Policy):
        """Skip odd steps (to see the registry used)."""

        name = "every_other"

        def skip(self, cache, st, probe):
            return st.step % 2 == 1

    register_policy(EveryOther)
    try:
        pipe = tiny_pipeline("flux")
        cachedit.accelerate(pipe, **EXACT, cache=dict(Fn=0, residual_diff_threshold=1.0, warmup_steps=0,
                                                      policy="every_other"))
        _run(pipe, "flux", steps=8)
        assert _contexts(pipe)["cond"]["cached_steps"] == [1, 3, 5, 7]
    finally:
        POLICIES.unregister("every_other")


def test_forecast_policy_skips_only_predictable_steps():
    pipe = tiny_pipeline("flux")
    base = _run(pipe, "flux")
    config = dict(Fn=1, Bn=0, warmup_steps=2, policy="forecast", calibrator="foca")
    cachedit.accelerate(pipe, **EXACT, cache={**config, "residual_diff_threshold": 0})
    assert torch.equal(_run(pipe, "flux"), base)
    cachedit.disable(pipe)
    cachedit.accelerate(pipe, **EXACT, cache={**config, "residual_diff_threshold": 5.0})
    _run(pipe, "flux")
    report = _contexts(pipe)["cond"]
    # a first-order forecast needs two computed steps; then the spent budget stays under the threshold
    assert report["cached_steps"] and min(report["cached_steps"]) >= 2 and STEPS - 1 not in report["cached_steps"]
    assert all(report["residual_diffs"][s] < 5.0 for s in report["cached_steps"])
    with pytest.raises(ValueError, match="Fn=0 is invalid for policy 'forecast'"):
        cachedit.CacheConfig(Fn=0, policy="forecast")


def test_calibration_records_each_cfg_branch_apart_by_call_order():
    from cachedit.cache.calibrate import record
    from cachedit.testing.reference import reference_call_kwargs, reference_pipeline

    pipe = reference_pipeline()
    runs = [dict(prompt="a handwritten digit 2", **reference_call_kwargs(num_inference_steps=6, seed=0))]
    recorded = record(pipe, runs)
    assert [len(steps) for steps in recorded] == [6, 6]  # true CFG: a cond and an uncond branch, each every step
    assert not torch.equal(recorded[0][-1]["output"], recorded[1][-1]["output"])
