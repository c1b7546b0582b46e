"""Shared fixtures: installing throwaway plugins through real entry points, and a clean plugin manager."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import cachedit.plugins

# The tiny models are too small for intra-op threads; on a 2-core machine shared with spawned ranks,
# OpenMP spin-waiting makes multi-threaded runs many times slower.
torch.set_num_threads(1)


def make_distribution(site: Path, dist: str, modules: dict[str, str], entry_points: dict[str, str]) -> Path:
    """Write modules plus a `.dist-info` with `entry_points.txt` into `site`: to importlib.metadata this is
    exactly an installed distribution, so its plugins load through the real entry-point machinery."""
    site.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[cachedit.plugins]\n{eps}\n")
    return site


def run_python(code: str, site: Path | None = None, env: dict | None = None, timeout: int = 300):
    """Run `code` in a fresh interpreter with `site` on the path; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    if site is not None:
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), full_env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


@pytest.fixture
def fresh_plugins():
    """The process-wide plugin manager, reloaded before and after the test."""
    yield cachedit.plugins.reload()
    cachedit.plugins.reload()


QKV = ("to_q", "to_k", "to_v")


def save_flux_lora(path: Path, target_modules=QKV, seed: int = 0, **lora) -> Path:
    """A LoRA on the tiny FLUX transformer's `target_modules` (random A and B from `seed`), made with peft
    and saved into `path` as diffusers saves LoRAs; `lora`: more LoraConfig fields (e.g. use_dora)."""
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from cachedit.testing.tiny import tiny_pipeline

    src = tiny_pipeline("flux")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        src.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(target_modules),
                                               init_lora_weights=False, **lora))
    FluxPipeline.save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(src.transformer))
    return path


@pytest.fixture(scope="session")
def make_flux_lora():
    """`save_flux_lora`, for tests that need other targets or settings."""
    return save_flux_lora


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory):
    """A LoRA on the tiny FLUX transformer's q/k/v (seed 0), saved once per session."""
    return save_flux_lora(tmp_path_factory.mktemp("lora"))
