"""The frontier bench: Pareto interpolation, the per-target table, and one end-to-end quick run on the tiny
pipeline that picks up a newly registered policy without editing the bench."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from cachedit.benchmarking.quality_frontier import fewer_steps, frontier_at, summary, table
from cachedit.cache.forecasts.interval import Interval
from cachedit.cache.policies import POLICIES, register_policy

BENCH = Path(__file__).resolve().parents[1] / "bench" / "frontier.py"


def _point(group, family, ideal, psnr, ssim=0.99, screen=False):
    return {"group": group, "family": family, "name": f"{family} {ideal}", "ideal": ideal, "psnr_db": psnr,
            "ssim": ssim, "lpips": None, "screen": screen}


def test_frontier_interpolates_the_pareto_points_and_never_extrapolates():
    pts = [(1.5, 50.0), (2.0, 40.0), (2.2, 30.0), (3.0, 35.0)]  # (2.2, 30) is dominated by (3.0, 35)
    assert frontier_at(pts, 2.5) == pytest.approx(40.0 - 5.0 * 0.5)
    assert frontier_at(pts, 2.0) == pytest.approx(40.0)
    assert frontier_at(pts, 1.0) is None and frontier_at(pts, 3.5) is None
    assert frontier_at([(2.0, 40.0)], 2.0) == 40.0


def test_table_names_the_best_family_per_side_and_the_margins():
    points = [_point("cachedit", "a", 1.5, 50), _point("cachedit", "a", 3.5, 30), _point("cachedit", "b", 2.0, 45),
              _point("cachedit", "b", 3.0, 42), _point("cachedit", "c", 1.0, 99, screen=True),
              _point("diffusers", "p", 2.0, 44), _point("diffusers", "p", 3.0, 36),
              _point("fewer steps", "fewer steps", 2.0, 30), _point("fewer steps", "fewer steps", 3.0, 25)]
    row = summary(points, targets=(2.5,))[0]
    assert row["cachedit"] == {"family": "b", "psnr_db": pytest.approx(43.5)}
    assert row["peer"] == {"family": "p", "psnr_db": pytest.approx(40.0)}
    text = table(points, targets=(2.5, 4.0))
    assert "| 2.5x | b: 43.50" in text and "+3.50 dB | +16.00 dB |" in text
    assert "| 4x | - | - | - | - | - |" in text


def test_fewer_steps_spans_the_targets():
    steps = fewer_steps(28)
    assert 14 in steps and 7 in steps and max(steps) < 28 and min(28 / s for s in steps) == 2.0
    assert max(28 / s for s in steps) >= 5


class _EveryOther(Interval):
    """A policy registered by a plugin after the bench was written."""

    name = "test-frontier-interval"

    @classmethod
    def tune_space(cls) -> list[dict]:
        return [dict(Fn=0, Bn=0, residual_diff_threshold=1.0, warmup_steps=1, policy_options={"interval": 2})]


def test_the_bench_runs_end_to_end_and_sweeps_a_newly_registered_policy(tmp_path):
    spec = importlib.util.spec_from_file_location("frontier_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    register_policy(_EveryOther)
    try:
        bench.main(["--model", "tiny", "--prompts", "2", "--steps", "6", "--quick", "--out", str(tmp_path),
                    "--policies", "interval", _EveryOther.name, "--calibrators", "none", "foca"])
    finally:
        POLICIES.unregister(_EveryOther.name)
    saved = json.loads((tmp_path / "frontier_tiny.json").read_text())
    points = saved["points"]
    groups = {p["group"] for p in points}
    assert {"cachedit", "fewer steps", "diffusers"} <= groups
    assert any(p["settings"].get("policy") == _EveryOther.name for p in points if p["group"] == "cachedit")
    assert {p["settings"]["calibrator"] for p in points if p["group"] == "cachedit"} == {None, "foca"}
    steps = [p for p in points if p["group"] == "fewer steps"]
    assert all(p["ideal"] == pytest.approx(6 / p["settings"]["num_inference_steps"]) for p in steps)
    assert all(0 < p["psnr_db"] <= 100 and 0 < p["ssim"] <= 1 for p in points)
    text = (tmp_path / "frontier_tiny.md").read_text()
    assert "| 2x |" in text and "every family's frontier" in text
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "frontier_tiny.png").stat().st_size > 0
    assert not (tmp_path / "frontier_tiny.partial.json").exists()
    bench.main(["--model", "tiny", "--out", str(tmp_path), "--replot"])  # tables again from the JSON
    assert (tmp_path / "frontier_tiny.md").read_text() == text
