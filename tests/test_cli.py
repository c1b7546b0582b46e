"""The command line: generate, bench (with peers), calibrate and demo on the shipped reference model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cachedit.benchmarking import (
    cachedit_method,
    default_methods,
    diffusers_method,
    frontier,
    headline,
    markdown,
    model_and_call,
    run_bench,
)
from cachedit.metrics import computed_fraction, psnr, ssim


def _cli(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "cachedit", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_generate_saves_image_and_record(tmp_path):
    _cli("generate", "--prompt", "a handwritten digit 3", "--steps", "8", "--cache", "fast", "--threshold", "0.3",
         "--calibrator", "taylorseer", "--out", str(tmp_path))
    record = json.loads((tmp_path / "seed0_steps8.json").read_text())
    assert (tmp_path / "seed0_steps8.png").stat().st_size > 0
    assert record["summary"]["cache"]["config"]["calibrator"] == "taylorseer"
    assert record["summary"]["cache"]["config"]["residual_diff_threshold"] == 0.3


def test_metrics():
    a = torch.rand(2, 3, 16, 16)
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0)
    noisy = (a + 0.05 * torch.randn_like(a)).clamp(0, 1)
    assert 20 < psnr(noisy, a) < 35 and ssim(noisy, a) < 0.99
    assert computed_fraction({"accelerated": False}) == 1.0


def test_bench_runs_ours_and_peers_side_by_side():
    from diffusers import FirstBlockCacheConfig

    load, call, prompts = model_and_call("reference")
    methods = [cachedit_method("never skips", role="overhead", residual_diff_threshold=0, warmup_steps=0),
               cachedit_method("DBCache t=0.3", Fn=1, Bn=0, residual_diff_threshold=0.3, warmup_steps=2),
               diffusers_method("FBC t=0.3", lambda: FirstBlockCacheConfig(threshold=0.3), threshold=0.3)]
    rows = run_bench(load, call, prompts[:1], 12, 1, methods=methods, log=lambda *a: None)
    by_name = {r["method"]: r for r in rows}
    assert by_name["uncached"]["ideal_speedup"] == 1.0 and by_name["uncached"]["psnr_db"] == float("inf")
    never = by_name["never skips"]  # bitwise the plain pipeline: same images, same FLOPs
    assert never["psnr_db"] == float("inf") and never["block_ideal_speedup"] == 1.0 and never["pairs"] == 1
    for name in ("DBCache t=0.3", "FBC t=0.3"):
        assert by_name[name]["block_ideal_speedup"] > 1.2 and 20 < by_name[name]["psnr_db"] < 80
    ours = by_name["DBCache t=0.3"]
    # skipped blocks are the skipped FLOPs; embedders and output layers always run
    assert 1.0 < ours["ideal_speedup"] <= ours["block_ideal_speedup"]
    assert "| DBCache t=0.3 |" in markdown(rows) and frontier(rows, "cachedit")
    summary = headline(rows)
    assert set(summary["overhead"]) == {"never skips"} and summary["max_overhead"] == never["time_ratio"]


def test_calibrate_command_prints_options(tmp_path):
    out = tmp_path / "mag.json"
    _cli("calibrate", "--model", "reference", "--policy", "magcache", "--steps", "8", "--runs", "2", "--out", str(out))
    ratios = json.loads(out.read_text())["mag_ratios"]
    assert len(ratios) == 8 and ratios[0] == 1.0
    out = tmp_path / "schedule.json"
    _cli("calibrate", "--model", "reference", "--policy", "schedule", "--speedup", "2", "--steps", "8", "--runs", "1",
         "--out", str(out))
    options = json.loads(out.read_text())
    assert options["num_steps"] == 8 and sum(len(s) for s in options["steps"].values()) == 8
    from cachedit.config import CacheConfig

    CacheConfig(Fn=0, Bn=0, warmup_steps=0, policy="schedule", policy_options=options)


@pytest.mark.parametrize("parallel", [["--parallel", "ulysses"],
                                      ["--parallel", "tp", "--parallel-text-encoder", "--parallel-vae"]],
                         ids=["ulysses", "tensor+text_encoder+vae"])
def test_generate_under_torchrun_matches_one_process(tmp_path, parallel):
    import numpy as np
    from PIL import Image

    args = ["generate", "--prompt", "a handwritten digit 4", "--steps", "8", "--cache", "fast"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "cachedit",
                           *args, *parallel, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _cli(*args, "--out", str(tmp_path / "one"))
    two = json.loads((tmp_path / "two" / "seed0_steps8.json").read_text())
    one = json.loads((tmp_path / "one" / "seed0_steps8.json").read_text())
    expected = dict(ulysses=2) if "ulysses" in parallel else dict(tensor=2, text_encoder=True, vae=True)
    assert two["world_size"] == 2 and expected.items() <= two["summary"]["parallel"].items()
    steps = lambda r: r["summary"]["cache"]["transformer"]["stacks"][0]["contexts"]["cond"]["cached_steps"]  # noqa: E731
    assert steps(two) == steps(one)
    pixels = [np.asarray(Image.open(tmp_path / d / "seed0_steps8.png")).astype(int) for d in ("one", "two")]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1  # 8-bit PNGs of outputs equal to ~1e-6


def test_demo_prints_its_own_output_only(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cachedit", "demo", "--steps", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "disable() restores bitwise-identical output: True" in proc.stdout
    # stderr holds the demo's own progress bar and nothing else: no third-party notices or loading bars
    lines = [line.strip() for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and all(line.startswith("demo:") for line in lines), lines


def test_bench_on_the_sd3_reference_leaves_out_what_cannot_run_there():
    """diffusers 0.42.1 has no `enable_cache` on SD3Transformer2DModel: its caches are left out of the default
    methods there, and a peer that fails on a model is logged and left out; cachedit's own rows always run."""
    from cachedit.benchmarking import Method
    from cachedit.benchmarking.methods import diffusers_can_cache

    load, call, prompts = model_and_call("reference-sd3")
    assert not diffusers_can_cache(load()) and diffusers_can_cache(model_and_call("reference")[0]())
    families = {m.family for m in default_methods(4, diffusers_caches=False)}
    assert "diffusers" not in families and "cachedit" in families

    def fail(pipe):
        raise AssertionError("peer bug")

    logged = []
    methods = [cachedit_method("never skips", residual_diff_threshold=0, warmup_steps=0),
               Method("cache-dit", "broken peer", fail, lambda p: None)]
    rows = run_bench(load, call, prompts[:1], 4, 1, methods=methods, log=logged.append)
    assert [r["method"] for r in rows] == ["uncached", "never skips"]
    assert any("broken peer: failed on this model" in line for line in logged)
    assert rows[1]["psnr_db"] == float("inf")
