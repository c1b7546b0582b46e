"""`cachedit tune`: the search space comes from the registries, the choice meets the target, the saved
file reproduces the trial, and the pipeline is left plain."""

from __future__ import annotations

import json
import math

import pytest
import torch

import cachedit
from cachedit.cache.calibrators import CALIBRATORS
from cachedit.cache.policies import POLICIES, DBCache, register_policy
from cachedit.cli import main
from cachedit.testing.reference import reference_call_kwargs, reference_pipeline
from cachedit.tune import Candidate, Trial, choose, search_space, tune, value_at

STEPS = 10


def _trial(family: str, threshold: float, speedup: float, psnr: float) -> Trial:
    return Trial(Candidate(family, {"residual_diff_threshold": threshold}), speedup, psnr)


def test_search_space_covers_every_registered_policy_and_calibrator():
    space = search_space()
    calibrated = {"magcache", "schedule"}  # searched once they have their calibrated options
    assert {c.cache["policy"] for c in space} == {n for n, p in POLICIES.items() if p.tune_space()} - calibrated
    assert {c.cache["calibrator"] for c in space} == {None, *CALIBRATORS}
    with_ratios = search_space(["magcache"], [None], {"magcache": {"mag_ratios": [1.0] * STEPS}})
    assert with_ratios and all(c.cache["policy_options"]["mag_ratios"] == [1.0] * STEPS for c in with_ratios)


def test_a_list_of_calibrated_options_gives_a_candidate_each_with_the_policys_calibrators():
    schedules = [{"steps": [0, 2, 5], "num_steps": STEPS}, {"steps": [0, 4], "num_steps": STEPS}]
    found = search_space(["schedule"], None, {"schedule": schedules})
    assert [c.cache["policy_options"] for c in found] == schedules
    assert {c.cache["calibrator"] for c in found} == set(POLICIES.get("schedule").tune_calibrators)


def test_a_registered_policy_is_searched_with_its_own_space():
    class Every(DBCache):
        name = "test-every"
        tune_thresholds = (0.5, 0.9)

    register_policy(Every)
    try:
        found = [c for c in search_space(calibrators=[None]) if c.cache["policy"] == "test-every"]
    finally:
        POLICIES.unregister("test-every")
    assert sorted(c.threshold for c in found if "steps_mask" not in c.cache) == [0.5, 0.9]


def test_choose_meets_the_target():
    trials = [_trial("a", 0.1, 1.8, 40.0), _trial("a", 0.2, 2.6, 33.0), _trial("b", 0.1, 2.2, 36.0),
              _trial("b", 0.3, 3.1, 30.0)]
    assert choose(trials, speedup=2.0).psnr_db == 36.0
    assert choose(trials, speedup=3.0).ideal_speedup == 3.1
    assert choose(trials, speedup=4.0) is None
    assert choose(trials, psnr=35.0).ideal_speedup == 2.2
    assert value_at(trials[:2], 2.2) == pytest.approx(36.5)
    assert value_at(trials[:2], 3.0) == -math.inf


@pytest.mark.parametrize("kwargs, field", [(dict(speedup=1.0), "speedup"), (dict(psnr=-1), "psnr"),
                                           (dict(), "exactly one target"), (dict(speedup=2, psnr=30), "exactly one")])
def test_invalid_targets_are_refused_before_any_run(kwargs, field):
    with pytest.raises(ValueError, match=field):
        tune(object(), [{"prompt": "x"}], **kwargs)


def test_tune_meets_the_target_and_its_file_reproduces_the_trial(tmp_path):
    pipe = reference_pipeline()
    runs = [dict(prompt="a handwritten digit 3", **reference_call_kwargs(num_inference_steps=STEPS, seed=5))]
    plain = pipe(**{**runs[0], "generator": torch.Generator().manual_seed(5)}).images
    candidates = [Candidate("dbcache +taylorseer", dict(Fn=1, Bn=0, residual_diff_threshold=t, warmup_steps=2,
                                                        calibrator="taylorseer")) for t in (0.05, 0.4, 1.0)]
    best, trials = tune(pipe, runs, speedup=1.4, candidates=candidates, refine=1)
    assert best is not None and best.ideal_speedup >= 1.4
    assert len(trials) > len(candidates)  # the family was bisected around the target
    assert all(best.psnr_db >= t.psnr_db for t in trials if t.ideal_speedup >= 1.4)
    again = pipe(**{**runs[0], "generator": torch.Generator().manual_seed(5)}).images
    assert torch.equal(again, plain)  # tuning left the pipeline exactly as it was

    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(best.candidate.cache))
    cachedit.accelerate(pipe, cache=str(path))
    from cachedit.metrics import psnr

    cached = pipe(**{**runs[0], "generator": torch.Generator().manual_seed(5)}).images
    assert psnr(cached, plain) == pytest.approx(best.psnr_db, abs=1e-6)


def test_cli_writes_a_loadable_config_and_refuses_bad_targets(tmp_path, capsys):
    out = tmp_path / "t" / "tuned.json"
    code = main(["tune", "--model", "reference", "--speedup", "1.3", "--steps", str(STEPS), "--prompts",
                 "a handwritten digit 1", "--policies", "dbcache", "--calibrators", "none", "--out", str(out)])
    assert code == 0
    cache = json.loads(out.read_text())
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["best"]["ideal_speedup"] >= 1.3 and report["best"]["cache"] == cache
    assert cachedit.config.CacheConfig(**cache).policy == "dbcache"
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--speedup", "0.5", "--out", str(out)])
    assert exc.value.code == 2 and "--speedup" in capsys.readouterr().err


def test_screening_keeps_the_best_families_for_the_full_runs(monkeypatch):
    import cachedit.tune as tune_module

    pipe = reference_pipeline()
    runs = [dict(prompt=f"a handwritten digit {d}", **reference_call_kwargs(num_inference_steps=STEPS, seed=d))
            for d in (2, 6)]
    monkeypatch.setattr(tune_module, "SCREEN_KEEP", 1)
    candidates = [Candidate(f"dbcache +{c}", dict(Fn=1, Bn=0, residual_diff_threshold=t, warmup_steps=2, calibrator=c))
                  for c in (None, "taylorseer") for t in (0.1, 0.6)]
    best, trials = tune(pipe, runs, speedup=1.3, candidates=candidates, refine=0)
    assert len({t.candidate.family for t in trials}) == 1 and len(trials) == 2  # one family ran on both prompts
    assert best is not None and best.ideal_speedup >= 1.3
