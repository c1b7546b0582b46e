"""Quality-only sweep of the issue-15 forecasts against the existing ones and diffusers' TaylorSeerCache.

    python bench/sweep_forecasts.py [--prompts 4] [--steps 28] [--shift 1.0] [--out bench/out/forecasts]

No timing (the machine is shared): per method the ideal speedup (executed transformer-block FLOPs of
the plain pipeline / the method's, FlopCounterMode) and the mean PSNR of its images against the
plain pipeline's, on the shipped reference model with true CFG (2 transformer calls per step).
Each family's Pareto frontier is interpolated linearly at the target ideal speedups (no
extrapolation: '-' beyond a family's range). `--shift` swaps the scheduler for one with that
sigma shift (the model was trained at 1.0; both runs compare against the plain run at the same
schedule), where timestep distances differ from step counts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cachedit.benchmarking.quality_frontier import BlockCounter, frontier_at
from cachedit.cli import quiet_third_party

TARGETS = (2.0, 2.5, 3.0, 4.0)


def methods(quick: bool = False) -> list[tuple[str, str, dict | None, object]]:
    """(family, name, cachedit cache dict or None, diffusers config factory or None)."""
    rows = []
    intervals = (2, 3, 4, 5, 6)
    new = {"interval TaylorSeer o1 (steps)": ("taylorseer", 1), "interval TaylorSeer o2 (steps)": ("taylorseer", 2),
           "interval taylorseer_t o2 (timesteps)": ("taylorseer_t", 2), "interval taylor_t o2 guarded": ("taylor_t", 2),
           "interval taylor_t o3 guarded": ("taylor_t", 3),
           "interval taylor_t o2 unguarded": ("taylor_t_unguarded", 2), "interval HiCache o2": ("hicache", 2),
           "interval FreqCa": ("freqca", 1), "interval FreqCa-low": ("freqca_low", 1), "interval FoCa": ("foca", 1),
           "interval FreqCa cutoff 0.1 (DC)": ("freqca_c0.1", 1), "interval FreqCa cutoff 0.5": ("freqca_c0.5", 1)}
    for family, (calibrator, order) in new.items():
        for n in intervals:
            rows.append((family, f"{family} N={n}", dict(Fn=0, Bn=0, residual_diff_threshold=1.0, warmup_steps=2,
                                                         policy="interval", policy_options={"interval": n},
                                                         calibrator=calibrator, taylorseer_order=order), None))
    if quick:
        return rows
    for t in (0.1, 0.2, 0.3, 0.45, 0.6):
        for name, calibrator in (("DBCache F1B0 +TaylorSeer", "taylorseer"), ("DBCache F1B0 +FoCa", "foca"),
                                 ("DBCache F1B0 +HiCache o2", "hicache")):
            rows.append((name, f"{name} t={t}", dict(Fn=1, Bn=0, residual_diff_threshold=t, warmup_steps=4,
                                                     max_continuous_cached_steps=3, calibrator=calibrator,
                                                     taylorseer_order=2 if calibrator == "hicache" else 1), None))
    for t in (0.1, 0.2, 0.4, 0.8, 1.6, 3.2):
        for name, calibrator in (("Forecast +FoCa", "foca"), ("Forecast +HiCache o2", "hicache")):
            rows.append((name, f"{name} t={t}", dict(Fn=1, Bn=0, residual_diff_threshold=t, warmup_steps=2,
                                                     policy="forecast", calibrator=calibrator,
                                                     taylorseer_order=2 if calibrator == "hicache" else 1), None))
    from diffusers import TaylorSeerCacheConfig

    for n in intervals:
        rows.append(("diffusers TaylorSeerCache lite", f"diffusers TaylorSeerCache lite interval={n}", None,
                     lambda n=n: TaylorSeerCacheConfig(cache_interval=n, disable_cache_before_step=3,
                                                       taylor_factors_dtype=torch.float32, use_lite_mode=True)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--shift", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="only the interval-policy families")
    parser.add_argument("--families", default="", help="comma-separated family names to keep (default: all)")
    parser.add_argument("--out", default="bench/out/forecasts")
    args = parser.parse_args()
    quiet_third_party()
    torch.set_num_threads(1)
    import cachedit
    from cachedit.benchmarking.measure import block_names, counted
    from cachedit.benchmarking.methods import model_and_call
    from cachedit.cache.calibrators import CALIBRATORS
    from cachedit.cache.forecasts import TimedTaylor
    from cachedit.metrics import psnr

    class Unguarded(TimedTaylor):
        def __init__(self, order: int = 1) -> None:
            super().__init__(order, guard=False)

    CALIBRATORS.register("taylor_t_unguarded", Unguarded)  # this sweep only: the guard's effect
    from cachedit.cache.forecasts import FreqCa

    for cutoff in (0.1, 0.5):  # and FreqCa's band split
        CALIBRATORS.register(f"freqca_c{cutoff}", type(f"FreqCa{cutoff}", (FreqCa,), {"cutoff": cutoff}))
    load0, call, prompts = model_and_call("reference")
    prompts = prompts[: args.prompts]

    def load():
        pipe = load0()
        if args.shift != 1.0:
            from diffusers import FlowMatchEulerDiscreteScheduler

            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=args.shift)
        return pipe

    plain = load()
    blocks = block_names(plain.transformer)
    counter = BlockCounter(plain, prompts[0], call(args.steps, 0))
    refs = {p: plain(prompt=p, **call(args.steps, i))[0] for i, p in enumerate(prompts)}
    results = []
    keep = {f.strip() for f in args.families.split(",") if f.strip()}
    for family, name, cache, factory in methods(args.quick):
        if keep and family not in keep:
            continue
        scores = []
        if cache is not None:  # executed block FLOPs: each block's calls that really computed
            cachedit.accelerate(plain, device="auto", cache=cache)
            counter.reset()
            for i, p in enumerate(prompts):
                scores.append(psnr(plain(prompt=p, **call(args.steps, i))[0], refs[p]))
            flops = counter.executed()
            cachedit.disable(plain)
        else:  # a peer, on a pipeline of its own: FLOPs counted
            pipe = load()
            pipe.transformer.enable_cache(factory())
            flops = 0
            for i, p in enumerate(prompts):
                out, _, b = counted(pipe, p, call(args.steps, i), blocks)
                flops += b
                scores.append(psnr(out, refs[p]))
        row = {"family": family, "method": name, "ideal": counter.plain * len(prompts) / flops,
               "psnr_db": sum(scores) / len(scores)}
        results.append(row)
        print(f"{name}: ideal {row['ideal']:.2f}x PSNR {row['psnr_db']:.2f} dB", flush=True)
    families = sorted({r["family"] for r in results})
    table = ["| family | " + " | ".join(f"{t}x" for t in TARGETS) + " |", "|---|" + "---|" * len(TARGETS)]
    for f in families:
        pts = [(r["ideal"], r["psnr_db"]) for r in results if r["family"] == f]
        cells = [frontier_at(pts, t) for t in TARGETS]
        table.append(f"| {f} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    text = "\n".join(table)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"shift{args.shift:g}_p{len(prompts)}" + ("_some" if keep else "")
    (out / f"sweep_{tag}.json").write_text(json.dumps({"args": vars(args), "rows": results}, indent=1))
    (out / f"sweep_{tag}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
