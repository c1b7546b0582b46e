"""Batched prompts: how much a batch changes what a cache computes, against each prompt run alone.

A cache that decides once per batch (cachedit's default, cache-dit, diffusers) lets one sample's change
decide for all; `CacheConfig(per_sample=True)` decides per row. For each method, on its own freshly
loaded pipeline: every prompt alone (seed = its index), then all prompts in one batch (generator i for
sample i, so the noise is the single runs'). Reported, PSNR over the images:
- `batch_vs_singles_db`: the batch against the method's own single runs (inf: batching changes nothing);
- `batch_vs_plain_db` / `singles_vs_plain_db`: against the plain pipeline's single runs (quality);
- the cached steps of the single runs and of the batch (per sample where the method reports them).
Quality only: no timing (a shared machine's speed numbers say little).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..metrics import psnr
from .methods import UNCACHED, Method, cache_dit_method, cachedit_method, diffusers_method


def batch_methods(threshold: float = 0.2) -> list[Method]:
    from diffusers import FirstBlockCacheConfig

    settings = dict(Fn=1, Bn=0, residual_diff_threshold=threshold, warmup_steps=4, max_continuous_cached_steps=3)
    methods = [cachedit_method(f"cachedit DBCache F1B0 t={threshold} batch-level", **settings),
               cachedit_method(f"cachedit DBCache F1B0 t={threshold} per-sample", per_sample=True, **settings),
               diffusers_method(f"diffusers FirstBlockCache t={threshold}",
                                lambda: FirstBlockCacheConfig(threshold=threshold), threshold=threshold)]
    peer = cache_dit_method(f"cache-dit DBCache F1B0 t={threshold}", Fn_compute_blocks=1, Bn_compute_blocks=0,
                            residual_diff_threshold=threshold, max_warmup_steps=4, max_continuous_cached_steps=3)
    return methods + ([peer] if peer is not None else [])


def _images(pipe, prompts, call: Callable, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    singles = torch.cat([pipe(prompt=p, **call(steps, i)).images for i, p in enumerate(prompts)])
    kwargs = call(steps, 0)
    kwargs["generator"] = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return singles, pipe(prompt=list(prompts), **kwargs).images


def _cached_steps(pipe) -> dict | None:
    import cachedit

    info = cachedit.summary(pipe).get("cache")
    if not info:
        return None
    contexts = info["transformer"]["stacks"][0]["contexts"]
    return {name: [s["cached_steps"] for s in r["samples"]] if "samples" in r else r["cached_steps"]
            for name, r in contexts.items()}


def _mean_cached(steps) -> float | None:
    """Mean number of cached steps per sample and CFG branch (None: the method reports none)."""
    if steps is None:
        return None
    if isinstance(steps, list):  # single runs: one report each
        values = [_mean_cached(s) for s in steps]
        return None if None in values else sum(values) / len(values)
    counts = [len(s) for v in steps.values() for s in (v if v and isinstance(v[0], list) else [v])]
    return sum(counts) / len(counts) if counts else 0.0


def run_batch_bench(load: Callable, call: Callable, prompts: list[str], steps: int,
                    methods: list[Method] | None = None, log: Callable = print) -> list[dict]:
    plain_singles, plain_batch = _images(load(), prompts, call, steps)
    rows = [{"method": "uncached", "family": "uncached", "batch_vs_singles_db": psnr(plain_batch, plain_singles),
             "batch_vs_plain_db": psnr(plain_batch, plain_singles), "singles_vs_plain_db": float("inf")}]
    for method in methods if methods is not None else batch_methods():
        if method is UNCACHED:
            continue
        pipe = load()
        method.apply(pipe)
        try:
            singles, single_steps = [], []
            for i, p in enumerate(prompts):
                singles.append(pipe(prompt=p, **call(steps, i)).images)
                single_steps.append(_cached_steps(pipe))
            singles = torch.cat(singles)
            kwargs = call(steps, 0)
            kwargs["generator"] = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
            batch = pipe(prompt=list(prompts), **kwargs).images
            batch_steps = _cached_steps(pipe)
        finally:
            method.remove(pipe)
        row = {"method": method.name, "family": method.family, "settings": method.settings,
               "batch_vs_singles_db": psnr(batch, singles), "batch_vs_plain_db": psnr(batch, plain_singles),
               "singles_vs_plain_db": psnr(singles, plain_singles),
               "max_abs_batch_vs_singles": (batch - singles).abs().max().item(),
               "single_cached_steps": single_steps, "batch_cached_steps": batch_steps,
               "mean_cached_singles": _mean_cached(single_steps), "mean_cached_batch": _mean_cached(batch_steps)}
        log(f"{row['method']}: batch vs own singles {row['batch_vs_singles_db']:.2f} dB")
        rows.append(row)
    return rows


def batch_markdown(rows: list[dict]) -> str:
    lines = ["| method | batch vs its single runs, PSNR dB | max abs diff | batch vs plain dB | singles vs plain dB | "
             "cached steps per sample and branch, singles / batch |", "|---|---|---|---|---|---|"]

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in rows:
        cached = f"{num(r.get('mean_cached_singles'), '.1f')} / {num(r.get('mean_cached_batch'), '.1f')}"
        lines.append(f"| {r['method']} | {r['batch_vs_singles_db']:.2f} | {num(r.get('max_abs_batch_vs_singles'), '.2e')} | "
                     f"{r['batch_vs_plain_db']:.2f} | {r['singles_vs_plain_db']:.2f} | {cached} |")
    return "\n".join(lines)
