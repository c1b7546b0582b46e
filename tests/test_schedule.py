"""The schedule policy computes exactly the listed steps, and the search finds the best listing for a budget."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import cachedit
from cachedit.cache.calibrate import calibrate, record_streams
from cachedit.cache.schedule_search import ScheduleSearch, best_paths, path_costs
from cachedit.config import CacheConfig
from cachedit.testing.reference import reference_call_kwargs, reference_pipeline
from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

STEPS = 8
PROMPT = "a handwritten digit 4"


def _cache(steps, **extra) -> dict:
    return dict(Fn=0, Bn=0, residual_diff_threshold=1.0, warmup_steps=0, calibrator="foca", policy="schedule",
                policy_options={"steps": steps, **extra})


def _run(pipe, cache=None, steps=STEPS):
    if cache is not None:
        cachedit.accelerate(pipe, cache=cache)
    try:
        image = pipe(PROMPT, **reference_call_kwargs(num_inference_steps=steps, seed=4))[0]
        report = cachedit.summary(pipe)["cache"]["transformer"]["stacks"][0]["contexts"] if cache else None
    finally:
        if cache is not None:
            cachedit.disable(pipe)
    return image, report


@pytest.fixture(scope="module")
def pipe():
    return reference_pipeline()


def test_computes_exactly_the_listed_steps_per_context(pipe):
    listed = {"cond": [0, 1, 3, 6], "uncond": [0, 2, 7]}
    _, report = _run(pipe, _cache(listed))
    for context, steps in listed.items():
        assert report[context]["cached_steps"] == [s for s in range(STEPS) if s not in steps]
    _, report = _run(pipe, _cache([0, 4]))  # one list: every context
    assert all(r["cached_steps"] == [1, 2, 3, 5, 6, 7] for r in report.values())


def test_an_unnamed_context_computes_every_step_and_num_steps_maps_the_list(pipe):
    _, report = _run(pipe, _cache({"cond": [0, 2, 4]}))
    assert report["uncond"]["cached_steps"] == [] and report["cond"]["cached_steps"] == [1, 3, 5, 6, 7]
    _, report = _run(pipe, _cache([0, 2], num_steps=4), steps=STEPS)  # 0 and 2 of 4 steps: 0 and 5 of 8
    assert report["cond"]["cached_steps"] == [1, 2, 3, 4, 6, 7]


def test_every_step_listed_is_bitwise_the_plain_pipeline(pipe):
    plain, _ = _run(pipe)
    cached, report = _run(pipe, _cache(list(range(STEPS))))
    assert all(r["cached_steps"] == [] for r in report.values())
    assert torch.equal(cached, plain)  # the blocks' own forward at every step: the same code path


def test_threshold_free_and_deterministic(pipe):
    steps = {"cond": [0, 1, 4], "uncond": [0, 3, 5]}
    first, _ = _run(pipe, _cache(steps))
    again, _ = _run(pipe, _cache(steps))
    other = dict(_cache(steps), residual_diff_threshold=1e-3)  # any threshold > 0: the same steps
    third, _ = _run(pipe, other)
    assert torch.equal(first, again) and torch.equal(first, third)


@pytest.mark.parametrize("options, field", [
    ({}, "'steps'"), ({"steps": [1, 2]}, "'steps'"), ({"steps": [0, 0, 1]}, "'steps'"),
    ({"steps": [0, -1]}, "'steps'"), ({"steps": [0, True]}, "'steps'"), ({"steps": "0,1"}, "'steps'"),
    ({"steps": {}}, "'steps'"), ({"steps": {"cond": [2]}}, "steps['cond']"), ({"steps": {"": [0]}}, "'steps'"),
    ({"steps": [0], "num_steps": 0}, "'num_steps'"), ({"steps": [0, 8], "num_steps": 8}, "'steps'"),
    ({"steps": [0], "bogus": 1}, "policy_options"),
])
def test_bad_options_are_refused_naming_the_field(options, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        CacheConfig(Fn=0, Bn=0, warmup_steps=0, policy="schedule", policy_options=options)


def test_warmup_is_refused_before_anything_changes(pipe):
    with pytest.raises(ValueError, match="warmup_steps"):
        cachedit.accelerate(pipe, cache=dict(_cache([0, 2]), warmup_steps=2))
    assert not hasattr(pipe.transformer, "_diffusers_hook") or not pipe.transformer._diffusers_hook.hooks


def _brute_force(errors: np.ndarray, k: int, objective: str) -> float:
    """Every schedule of k computed steps starting at 0, its cost summed (or maxed) step by step."""
    n = errors.shape[1]
    best = np.inf
    for rest in itertools.combinations(range(1, n), k - 1):
        steps = (0, *rest)
        costs = []
        for pos, i in enumerate(steps):
            a = 0 if pos == 0 else steps[pos - 1] + 1
            end = steps[pos + 1] if pos + 1 < len(steps) else n
            costs += [errors[a, i, j] for j in range(i + 1, end)]
        value = (sum(costs) if objective == "sum" else max(costs, default=0.0))
        best = min(best, value)
    return best


@pytest.mark.parametrize("objective", ["sum", "max"])
def test_the_search_finds_the_best_path(objective):
    n = 7
    errors = np.random.default_rng(0).random((n + 1, n, n))
    paths = best_paths(path_costs(errors, objective), objective)
    assert [len(steps) for _, steps in paths] == list(range(1, n + 1))
    assert all(steps[0] == 0 for _, steps in paths)
    for k in range(1, n + 1):
        assert paths[k - 1][0] == pytest.approx(_brute_force(errors, k, objective))
    assert paths[-1] == (0.0, list(range(n)))


def test_budget_split_follows_the_weights():
    def context(scale):  # residuals that change faster are harder to forecast: they need more computed steps
        torch.manual_seed(0)
        base, walk = torch.randn(1, 4, 8), torch.randn(12, 1, 4, 8)
        return {"timesteps": [1.0 - s / 12 for s in range(12)],
                "residuals": [[base + scale * walk[: s + 1].sum(0)] for s in range(12)]}
    search = ScheduleSearch([{"cond": context(1.0), "uncond": context(0.1)}], "foca")
    split = search.split(12)
    assert sum(split.values()) == 12 and split["cond"] > split["uncond"]
    assert search.split(12, weights={"cond": 0.0, "uncond": 1.0})["uncond"] > split["uncond"]
    assert search.split(12, "even") == {"cond": 6, "uncond": 6}
    options = search.options(2.0)
    assert sum(len(v) for v in options["steps"].values()) == 12 and options["num_steps"] == 12
    CacheConfig(**_cache(options["steps"], num_steps=12))
    shared = search.options(2.0, split="shared")["steps"]
    assert len(shared) == 6 and shared == search.shared(6)[1] and shared[0] == 0
    CacheConfig(**_cache(shared, num_steps=12))
    for bad, field in ((dict(speedup=0.5), "speedup"), (dict(speedup=2, split="odd"), "split"),
                       (dict(speedup=2, weights={"cond": -1}), "weights")):
        with pytest.raises(ValueError, match=field):
            search.options(**bad)


def test_calibration_on_a_tiny_pipeline_gives_a_schedule_that_runs():
    pipe = tiny_pipeline("flux")
    runs = [dict(prompt="a photo of a cat", **tiny_call_kwargs("flux", num_inference_steps=6, seed=1))]
    recorded = record_streams(pipe, runs)
    assert set(recorded[0]) == {"cond", "uncond"} and len(recorded[0]["cond"]["timesteps"]) == 6
    options = calibrate(pipe, "schedule", runs, speedup=2)
    assert {len(s) for s in options["steps"].values()} <= {2, 3, 4} and options["num_steps"] == 6
    assert sum(len(s) for s in options["steps"].values()) == 6
    cachedit.accelerate(pipe, cache=_cache(options["steps"], num_steps=6))
    pipe("a photo of a cat", **tiny_call_kwargs("flux", num_inference_steps=6, seed=1))
    contexts = cachedit.summary(pipe)["cache"]["transformer"]["stacks"][0]["contexts"]
    cachedit.disable(pipe)
    for name, steps in options["steps"].items():
        assert contexts[name]["cached_steps"] == [s for s in range(6) if s not in steps]
    with pytest.raises(ValueError, match="objective"):
        calibrate(pipe, "schedule", runs, speedup=2, objective="mean")
    with pytest.raises(ValueError, match="takes no options"):
        calibrate(pipe, "magcache", runs, speedup=2)
