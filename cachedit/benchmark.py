"""`cachedit bench`: cache policies and peers side by side on one model, prompts and seeds.

Every method runs on a freshly loaded pipeline (peers patch or bind state that outlives their
own disable), in this process, against the same uncached reference images. For each method and
setting: the ideal speedup as uncached / cached transformer FLOPs (counted by
torch.utils.flop_counter, so skipped work of any method counts the same), the measured speedup
of the transformer calls and of the whole pipeline call (latency avg / min / P50 / P90 / P99
over repeats), and PSNR / SSIM against the uncached images. Writes JSON, a markdown table and
a PNG plot of the quality/speed frontier.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .metrics import computed_fraction, psnr, ssim


@dataclass
class Method:
    """One way to speed a pipeline up: `apply(pipe)` before the runs, `remove(pipe)` after."""

    family: str  # "uncached", "cachedit", "cache-dit", "diffusers"
    name: str
    apply: Callable = field(repr=False)
    remove: Callable = field(repr=False)
    settings: dict = field(default_factory=dict)


def _cachedit(name: str, **cache) -> Method:
    import cachedit

    return Method("cachedit", name, lambda p: cachedit.accelerate(p, device="cpu_ref", attention="torch_sdpa",
                                                                  cache=cache), cachedit.disable, cache)


def _cache_dit(name: str, taylorseer: bool = False, **cfg) -> Method | None:
    try:
        import cache_dit
    except ImportError:
        return None

    def apply(pipe):
        calib = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
        cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(**cfg), calibrator_config=calib)

    return Method("cache-dit", name, apply, cache_dit.disable_cache, {**cfg, "taylorseer": taylorseer})


def _diffusers(name: str, config_factory: Callable, **settings) -> Method:
    return Method("diffusers", name, lambda p: p.transformer.enable_cache(config_factory()),
                  lambda p: p.transformer.disable_cache(), settings)


def default_methods(steps: int, mag_ratios=None, calibrated: dict | None = None) -> list[Method]:
    """Every method and setting the frontier is drawn from. `calibrated`: cachedit's own TeaCache
    polynomial and MagCache ratios for this model ({"teacache": {...}, "magcache": {...}})."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    methods = [Method("uncached", "uncached", lambda p: None, lambda p: None)]
    for t in (0.05, 0.1, 0.2, 0.3):
        methods.append(_cachedit(f"DBCache F1B0 t={t}", Fn=1, Bn=0, residual_diff_threshold=t, warmup_steps=4,
                                 max_continuous_cached_steps=3))
        methods.append(_cachedit(f"DBCache F1B0 t={t} +TaylorSeer", Fn=1, Bn=0, residual_diff_threshold=t,
                                 warmup_steps=4, max_continuous_cached_steps=3, calibrator="taylorseer"))
        methods.append(_cachedit(f"DBCache F1B0 t={t} +FoCa", Fn=1, Bn=0, residual_diff_threshold=t,
                                 warmup_steps=4, max_continuous_cached_steps=3, calibrator="foca"))
        for ts in (False, True):
            m = _cache_dit(f"cache-dit DBCache F1B0 t={t}" + (" +TaylorSeer" if ts else ""), taylorseer=ts,
                           Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=t, max_warmup_steps=4,
                           max_continuous_cached_steps=3)
            if m is not None:
                methods.append(m)
    calibrated = calibrated or {}
    for t in (0.3, 0.6, 1.0, 2.0):
        if "teacache" in calibrated:
            methods.append(_cachedit(f"TeaCache t={t} +TaylorSeer", Fn=0, residual_diff_threshold=t, warmup_steps=0,
                                     policy="teacache", policy_options=calibrated["teacache"], calibrator="taylorseer"))
    for t in (0.1, 0.2, 0.4, 0.8):
        if "magcache" in calibrated:
            methods.append(_cachedit(f"MagCache t={t}", Fn=0, residual_diff_threshold=t, warmup_steps=0,
                                     policy="magcache", policy_options={**calibrated["magcache"], "max_skip_steps": 5}))
    for t in (0.2, 0.4, 0.8, 1.5):
        methods.append(_cachedit(f"EasyCache t={t} +TaylorSeer", Fn=0, residual_diff_threshold=t, warmup_steps=0,
                                 policy="easycache", calibrator="taylorseer"))
    for t in (0.1, 0.2, 0.4, 0.8):
        methods.append(_cachedit(f"Forecast t={t} +FoCa", Fn=1, Bn=0, residual_diff_threshold=t, warmup_steps=2,
                                 policy="forecast", calibrator="foca"))
    for policy in ("medium", "fast", "ultra"):
        methods.append(_cachedit(f"step mask {policy} +TaylorSeer", Fn=1, Bn=0, residual_diff_threshold=0,
                                 warmup_steps=0, steps_mask=policy, mask_mode="static", calibrator="taylorseer"))
    for t in (0.05, 0.1, 0.2, 0.3):
        methods.append(_diffusers(f"diffusers FirstBlockCache t={t}", lambda t=t: FirstBlockCacheConfig(threshold=t),
                                  threshold=t))
    for interval in (2, 3, 4):
        methods.append(_diffusers(f"diffusers TaylorSeerCache interval={interval}",
                                  lambda i=interval: TaylorSeerCacheConfig(cache_interval=i, disable_cache_before_step=3,
                                                                           taylor_factors_dtype=torch.float32),
                                  cache_interval=interval))
    if mag_ratios is not None:
        for t in (0.02, 0.06, 0.12, 0.24):
            methods.append(_diffusers(f"diffusers MagCache t={t}", lambda t=t: MagCacheConfig(
                threshold=t, num_inference_steps=steps, mag_ratios=mag_ratios), threshold=t))
    return methods


def calibrate_mag_ratios(load: Callable, call: Callable, prompt: str, steps: int) -> list[float] | None:
    """MagCache needs per-model magnitude ratios: one calibration run with diffusers' own hook,
    whose result diffusers only logs, so it is read from that log record."""
    import ast
    import logging

    from diffusers import MagCacheConfig

    found: list[list[float]] = []
    handler = logging.Handler()
    handler.emit = lambda record: found.append(record.getMessage())
    logger = logging.getLogger("diffusers.hooks.mag_cache")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        pipe = load()
        pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
        pipe(prompt=prompt, **call(steps, 0))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    for message in found:
        if "Calibration Results:" in message:
            return [float(r) for r in ast.literal_eval(message.split("Calibration Results:", 1)[1].strip())]
    return None


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def measure(method: Method, load: Callable, call: Callable, prompts: list[str], steps: int, repeats: int,
            references: dict | None) -> tuple[dict, dict]:
    pipe = load()
    method.apply(pipe)
    transformer_time = [0.0]

    def start(*_):
        transformer_time.append(time.perf_counter())

    def stop(*_):
        transformer_time[0] += time.perf_counter() - transformer_time.pop()

    pre = pipe.transformer.register_forward_pre_hook(start)
    post = pipe.transformer.register_forward_hook(stop)
    images, flops, wall, inner = {}, 0, [], []
    for i, prompt in enumerate(prompts):
        with FlopCounterMode(display=False) as counter:  # cost, counted once per prompt
            images[prompt] = pipe(prompt=prompt, **call(steps, i))[0]
        flops += counter.get_total_flops()
        for _ in range(repeats):
            transformer_time[0] = 0.0
            t0 = time.perf_counter()
            out = pipe(prompt=prompt, **call(steps, i))[0]
            wall.append(time.perf_counter() - t0)
            inner.append(transformer_time[0])
            assert torch.equal(out, images[prompt]) or method.family != "cachedit", "cachedit must be deterministic"
    pre.remove(), post.remove()
    fraction = None
    if method.family == "cachedit":
        import cachedit

        fraction = computed_fraction(cachedit.summary(pipe))
    method.remove(pipe)
    row = {"family": method.family, "method": method.name, "settings": method.settings, "flops": flops,
           "flops_per_step": flops / (steps * len(prompts)),
           "latency_s": {"avg": statistics.mean(wall), "min": min(wall), "p50": _percentile(wall, 0.5),
                         "p90": _percentile(wall, 0.9), "p99": _percentile(wall, 0.99)},
           "transformer_s": statistics.median(inner), "computed_fraction": fraction}
    if references is not None:
        row["psnr_db"] = statistics.mean(psnr(images[p], references[p]) for p in prompts)
        row["ssim"] = statistics.mean(ssim(images[p], references[p]) for p in prompts)
    return row, images


def run_bench(load: Callable, call: Callable, prompts: list[str], steps: int, repeats: int,
              methods: list[Method] | None = None, log: Callable = print) -> list[dict]:
    torch.manual_seed(0)
    if methods is None:
        from .cache.calibrate import calibrate

        runs = [dict(prompt=prompts[i % len(prompts)], **call(steps, 100 + i)) for i in range(3)]  # unseen seeds
        calibrated = {p: calibrate(load(), p, runs) for p in ("teacache", "magcache")}
        methods = default_methods(steps, calibrate_mag_ratios(load, call, prompts[0], steps), calibrated)
    base, references = measure(methods[0], load, call, prompts, steps, repeats, None)
    base.update(psnr_db=float("inf"), ssim=1.0)
    rows = [base]
    log(f"{base['method']}: {base['latency_s']['p50']:.3f} s")
    for method in methods[1:]:
        row, _ = measure(method, load, call, prompts, steps, repeats, references)
        rows.append(row)
        log(f"{row['method']}: ideal {base['flops'] / row['flops']:.2f}x, PSNR {row['psnr_db']:.2f} dB")
    for row in rows:
        row["ideal_speedup"] = base["flops"] / row["flops"]
        row["speedup"] = base["latency_s"]["p50"] / row["latency_s"]["p50"]
        row["transformer_speedup"] = base["transformer_s"] / row["transformer_s"]
        row["measured_over_ideal"] = row["transformer_speedup"] / row["ideal_speedup"]
        if row["computed_fraction"]:  # the cache's own count: ideal = total / computed block calls
            row["block_ideal_speedup"] = 1.0 / row["computed_fraction"]
            row["measured_over_block_ideal"] = row["transformer_speedup"] * row["computed_fraction"]
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| method | ideal x | transformer x | measured/ideal | pipeline x | p50 s | p90 s | p99 s | "
            "PSNR dB | SSIM |")
    lines = [head, "|" + "---|" * 10]
    for r in sorted(rows, key=lambda r: (r["family"] != "uncached", r["family"], r["ideal_speedup"])):
        lat = r["latency_s"]
        lines.append(f"| {r['method']} | {r['ideal_speedup']:.2f} | {r['transformer_speedup']:.2f} | "
                     f"{r['measured_over_ideal']:.2f} | {r['speedup']:.2f} | {lat['p50']:.3f} | {lat['p90']:.3f} | "
                     f"{lat['p99']:.3f} | {r['psnr_db']:.2f} | {r['ssim']:.4f} |")
    return "\n".join(lines)


def frontier(rows: list[dict], family: str) -> list[dict]:
    """The family's Pareto-best rows: none both faster (ideal) and higher PSNR."""
    mine = [r for r in rows if r["family"] == family]
    return [r for r in mine if not any(o["ideal_speedup"] >= r["ideal_speedup"] and o["psnr_db"] > r["psnr_db"]
                                       and o is not r for o in mine)]


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "ideal_speedup", "ideal speedup (FLOPs)"),
                           (axes[1], "speedup", "measured pipeline speedup")):
        for family in sorted({r["family"] for r in rows} - {"uncached"}):
            pts = sorted((r[key], min(r["psnr_db"], 60)) for r in rows if r["family"] == family)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=family)
        ax.set_xlabel(label)
        ax.set_ylabel("PSNR vs uncached (dB)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def save_table(out: str | Path, stem: str, payload: dict, text: str) -> None:
    """Write `stem`.json (the payload) and `stem`.md (the table) under `out`, and print the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / f"{stem}.md").write_text(text + "\n")
    print(text)


def write(rows: list[dict], out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    (out / "bench.md").write_text(f"{json.dumps(meta)}\n\n{markdown(rows)}\n")
    plot(rows, out / "bench.png")


def add_arguments(p) -> None:
    from .arguments import model_source, positive_int, writable_dir

    p.add_argument("--model", default="reference", type=model_source("reference", "tiny"),
                   help="'reference' (built in), 'tiny' (random FLUX) or a folder")
    p.add_argument("--steps", type=positive_int, default=28)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--prompts", nargs="+", default=None, help="default: digits 0-9 prompts for the reference model")
    p.add_argument("--out", default="bench/out/frontier", type=writable_dir)


def model_and_call(model: str):
    """(load, call(steps, seed), default prompts) for a model name or folder."""
    from .generate import call_kwargs, load_pipeline

    if model == "tiny":
        from .testing.tiny import tiny_call_kwargs, tiny_pipeline

        def call(steps, seed):
            kwargs = tiny_call_kwargs("flux", num_inference_steps=steps, seed=seed)
            kwargs.pop("negative_prompt"), kwargs.pop("true_cfg_scale")
            return kwargs

        return lambda: tiny_pipeline("flux"), call, ["a photo of a cat", "a red monkey"]
    prompts = [f"a handwritten digit {d}" for d in range(10)] if model == "reference" else ["a photo of a cat"]
    return (lambda: load_pipeline(model)), (lambda steps, seed: call_kwargs(model, steps, seed)), prompts


def run(args) -> int:
    torch.set_num_threads(1)  # the small reference model: intra-op threads only add noise
    load, call, prompts = model_and_call(args.model)
    prompts = args.prompts or prompts
    rows = run_bench(load, call, prompts, args.steps, args.repeats)
    meta = {"model": args.model, "steps": args.steps, "repeats": args.repeats, "prompts": prompts,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    write(rows, Path(args.out), meta)
    print(markdown(rows))
    print(f"wrote {args.out}/bench.json, bench.md, bench.png")
    return 0
