"""Timing against the plain pipeline, interleaved, and FLOP counts of what was computed.

Each method runs on its own freshly loaded pipeline (peers patch or bind state that outlives their
own disable) beside one plain, never-accelerated pipeline. For every prompt and repeat the plain
pipeline runs, then the method's, and the ratio of the two times is recorded: drift and other load
on the machine reach both runs of a pair alike, and the median of the paired ratios is reported.
Times are the process's CPU time by default: on a shared machine that is what the work itself
costs (the models run single-threaded); `Clock("wall")` measures wall time instead.
"""

from __future__ import annotations

import hashlib
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..metrics import psnr, ssim
from .methods import UNCACHED, Method


@dataclass(frozen=True)
class Clock:
    kind: str = "cpu"  # "cpu": time.process_time; "wall": time.perf_counter

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "wall"):
            raise ValueError(f"Clock.kind={self.kind!r} is invalid; allowed values: 'cpu', 'wall'")

    def now(self) -> float:
        return time.process_time() if self.kind == "cpu" else time.perf_counter()


class TransformerTimer:
    """Accumulates the time spent inside `pipe.transformer` during one pipeline call."""

    def __init__(self, pipe, clock: Clock) -> None:
        self.clock, self.total, self._start = clock, 0.0, []
        self.handles = (pipe.transformer.register_forward_pre_hook(lambda *_: self._start.append(clock.now())),
                        pipe.transformer.register_forward_hook(self._stop))

    def _stop(self, *_) -> None:
        self.total += self.clock.now() - self._start.pop()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _timed(pipe, timer: TransformerTimer, prompt: str, kwargs: dict) -> tuple[float, float, torch.Tensor]:
    timer.total = 0.0
    start = timer.clock.now()
    out = pipe(prompt=prompt, **kwargs)[0]
    return timer.clock.now() - start, timer.total, out


def block_names(transformer: torch.nn.Module) -> re.Pattern:
    """FlopCounterMode names modules "<Class>.<path>"; this matches the transformer blocks' own entries."""
    from ..adapters import adapter_for

    blocks = {b for stack in adapter_for(transformer).stacks(transformer) for b in stack}
    stacks = {name.rsplit(".", 1)[0] for name, m in transformer.named_modules() if m in blocks}
    return re.compile(r"(^|\.)(" + "|".join(re.escape(s) for s in sorted(stacks)) + r")\.\d+$")


def counted(pipe, prompt: str, kwargs: dict, blocks: re.Pattern) -> tuple[torch.Tensor, int, int]:
    """One call under FlopCounterMode: (output, all FLOPs, transformer-block FLOPs)."""
    with FlopCounterMode(display=False) as counter:
        out = pipe(prompt=prompt, **kwargs)[0]
    per_module = counter.get_flop_counts()
    block = sum(sum(v.values()) for name, v in per_module.items() if blocks.search(name))
    return out, counter.get_total_flops(), block


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def measure(method: Method, plain, load: Callable, call: Callable, prompts: list[str], steps: int, repeats: int,
            references: dict, blocks: re.Pattern, clock: Clock) -> tuple[dict, dict]:
    """One method against the plain pipeline: paired time ratios, FLOPs, images and their quality."""
    pipe = load()
    method.apply(pipe)
    timers = TransformerTimer(plain, clock), TransformerTimer(pipe, clock)
    images, flops, block_flops = {}, 0, 0
    ratios, inner_ratios, latency, plain_latency = [], [], [], []
    try:
        for i, prompt in enumerate(prompts):
            images[prompt], total, block = counted(pipe, prompt, call(steps, i), blocks)  # also the warm-up
            flops, block_flops = flops + total, block_flops + block
        for _ in range(repeats):
            for i, prompt in enumerate(prompts):
                base_s, base_inner, _ = _timed(plain, timers[0], prompt, call(steps, i))
                seconds, inner, out = _timed(pipe, timers[1], prompt, call(steps, i))
                if method.deterministic and not torch.equal(out, images[prompt]):
                    raise RuntimeError(f"{method.name}: two calls with the same seed gave different images")
                ratios.append(seconds / base_s)
                inner_ratios.append(inner / base_inner)
                latency.append(seconds)
                plain_latency.append(base_s)
    finally:
        for timer in timers:
            timer.close()
    method.remove(pipe)
    row = {"family": method.family, "method": method.name, "settings": method.settings, "role": method.role,
           "flops": flops, "block_flops": block_flops, "flops_per_step": flops / (steps * len(prompts)),
           "time_ratio": statistics.median(ratios), "transformer_time_ratio": statistics.median(inner_ratios),
           "latency_s": {"avg": statistics.mean(latency), "min": min(latency), "p50": _percentile(latency, 0.5),
                         "p90": _percentile(latency, 0.9), "p99": _percentile(latency, 0.99)},
           "plain_latency_s": statistics.median(plain_latency), "clock": clock.kind, "pairs": len(ratios),
           "psnr_db": statistics.mean(psnr(images[p], references[p]) for p in prompts),
           "ssim": statistics.mean(ssim(images[p], references[p]) for p in prompts),
           "images_sha1": fingerprint(images)}
    return row, images


def fingerprint(images: dict) -> str:
    """Equal for bitwise-equal images: tells identical outputs of two methods apart from merely close ones."""
    digest = hashlib.sha1()
    for key in sorted(images):
        digest.update(images[key].detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_bench(load: Callable, call: Callable, prompts: list[str], steps: int, repeats: int,
              methods: list[Method] | None = None, log: Callable = print, clock: Clock = Clock()) -> list[dict]:
    """Every method against one plain pipeline. Rows carry the ideal speedups (FLOP-counted over the
    whole call and over the transformer blocks), the measured ones (medians of paired ratios) and
    measured / ideal, where ideal counts the executed block FLOPs."""
    torch.manual_seed(0)
    if methods is None:
        from ..cache.calibrate import calibrate
        from .methods import calibrate_mag_ratios, default_methods, diffusers_can_cache

        runs = [dict(prompt=prompts[i % len(prompts)], **call(steps, 100 + i)) for i in range(3)]  # unseen seeds
        calibrated = {p: calibrate(load(), p, runs) for p in ("teacache", "magcache")}
        methods = default_methods(steps, calibrate_mag_ratios(load, call, prompts[0], steps), calibrated,
                                  diffusers_caches=diffusers_can_cache(load()))
    methods = [m for m in methods if m.family != "uncached"]
    plain = load()
    blocks = block_names(plain.transformer)
    references, base_flops, base_blocks = {}, 0, 0
    for i, prompt in enumerate(prompts):
        references[prompt], total, block = counted(plain, prompt, call(steps, i), blocks)
        base_flops, base_blocks = base_flops + total, base_blocks + block
    rows = [{"family": "uncached", "method": UNCACHED.name, "settings": {}, "role": "", "flops": base_flops,
             "block_flops": base_blocks, "flops_per_step": base_flops / (steps * len(prompts)), "time_ratio": 1.0,
             "transformer_time_ratio": 1.0, "psnr_db": float("inf"), "ssim": 1.0, "clock": clock.kind}]
    for method in methods:
        try:
            row, _ = measure(method, plain, load, call, prompts, steps, repeats, references, blocks, clock)
        except Exception as exc:  # a peer that fails on this model (each runs on its own fresh pipeline)
            if method.family == "cachedit":
                raise
            log(f"{method.name}: failed on this model, left out ({type(exc).__name__}: {exc})")
            continue
        rows.append(row)
        log(f"{row['method']}: {row['time_ratio']:.3f}x the plain time, ideal "
            f"{base_blocks / max(row['block_flops'], 1):.2f}x, PSNR {row['psnr_db']:.2f} dB")
    for row in rows:
        row["ideal_speedup"] = base_flops / row["flops"]
        row["block_ideal_speedup"] = base_blocks / row["block_flops"] if row["block_flops"] else None
        row["speedup"] = 1.0 / row["time_ratio"]
        row["transformer_speedup"] = 1.0 / row["transformer_time_ratio"]
        ideal = row["block_ideal_speedup"] or row["ideal_speedup"]
        row["measured_over_ideal"] = row["transformer_speedup"] / ideal
    return rows
