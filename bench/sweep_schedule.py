"""Quality-only sweep of the searched schedule policy against interval + FoCa, diffusers' TaylorSeerCache lite
and plain fewer steps, on a shipped reference model.

    python bench/sweep_schedule.py --model reference       # FLUX, true CFG 2 ("cond" / "uncond" calls)
    python bench/sweep_schedule.py --model reference-sd3   # SD3, CFG 4 batched in one call

No timing (the machine is shared). Ideal speedup: executed transformer-block FLOPs of the plain pipeline over
the method's (sweep_forecasts.BlockCounter; fewer steps: steps / fewer). PSNR: of the images against the plain
pipeline's at the full step count, mean over the evaluation prompts (digits 0 .. 7, seeds 0 .. 7). The
schedules are searched on other prompts and seeds (digits 8 and 9, seeds 1000 and 1001). Each family's Pareto
frontier is interpolated linearly at the targets, never extrapolated ('-'). Also written: the split of the
computed steps between the CFG branches the search picks, and the search's own estimate per branch (on SD3,
per row of the batched call: row 0 is uncond, row 1 cond).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cachedit.cli import quiet_third_party  # noqa: E402

TARGETS = (2.0, 2.5, 3.0, 4.0, 5.0)


def _rows(recorded: list[dict]) -> list[dict]:
    """Batched CFG: each row of the one context as a context of its own (row 0 uncond, row 1 cond)."""
    out = []
    for run in recorded:
        ((_, entry),) = run.items()
        rows = entry["residuals"][0][0].shape[0]
        out.append({f"row{r}": {"timesteps": entry["timesteps"],
                                "residuals": [[s[r:r + 1] for s in step] for step in entry["residuals"]]}
                    for r in range(rows)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="reference", choices=("reference", "reference-sd3"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--families", default="", help="comma-separated family names to keep (default: all)")
    parser.add_argument("--variants", default="all", choices=("all", "main"),
                        help="main: the search split and min-max only (with the shared-steps min-max under CFG)")
    parser.add_argument("--speedups", default="1.6,1.8,2,2.25,2.5,2.75,3,3.5,4,4.5,5,6",
                        help="the schedules' target ideal speedups (computed calls rounded)")
    parser.add_argument("--intervals", default="2,3,4,5,6,7", help="interval FoCa / TaylorSeerCache lite settings")
    parser.add_argument("--fewer", default="18,14,12,11,10,9,8,7,6,5,4", help="step counts of plain fewer steps")
    parser.add_argument("--out", default="bench/out/schedule")
    args = parser.parse_args()
    quiet_third_party()
    torch.set_num_threads(1)
    import cachedit
    from cachedit.benchmarking.measure import block_names, counted
    from cachedit.benchmarking.methods import diffusers_can_cache, model_and_call
    from cachedit.cache.calibrate import record_streams
    from cachedit.cache.schedule_search import ScheduleSearch
    from cachedit.metrics import psnr
    from sweep_forecasts import BlockCounter, frontier_at

    load, call, prompts = model_and_call(args.model)
    evaluation, calibration = prompts[: args.prompts], prompts[8:10]
    n = args.steps
    plain = load()
    sd3 = args.model == "reference-sd3"
    guidance = call(n, 0).get("guidance_scale" if sd3 else "true_cfg_scale", 1.0)
    runs = [dict(prompt=p, **call(n, 1000 + s)) for p in calibration for s in range(2)]
    recorded = record_streams(plain, runs)
    searches = {"sum": ScheduleSearch(recorded, "foca"), "max": ScheduleSearch(recorded, "foca", objective="max")}
    contexts = searches["sum"].contexts
    calls = len(contexts) * n  # transformer calls per image (one per context and step)
    blocks = block_names(plain.transformer)
    counter = BlockCounter(plain, evaluation[0], call(n, 0))
    refs = {p: plain(prompt=p, **call(n, i))[0] for i, p in enumerate(evaluation)}
    keep = {f.strip() for f in args.families.split(",") if f.strip()}

    base = dict(Fn=0, Bn=0, residual_diff_threshold=1.0, calibrator="foca")
    cfg_weights = {"cond": guidance, "uncond": guidance - 1}
    rows_meta = []
    methods = []  # (family, name, cache dict | None, diffusers factory | None, steps)
    ints = lambda text: [int(v) for v in text.split(",") if v]  # noqa: E731
    dense = sorted({math.floor(calls / float(s) + 1e-9) for s in args.speedups.split(",") if s})  # >= the speedup
    for total in dense:
        speedup = calls / total
        variants = [("schedule FoCa (search split)", "sum", "search", None)]
        if len(contexts) > 1 and args.variants == "all":
            variants += [("schedule FoCa (even split)", "sum", "even", None),
                         ("schedule FoCa (shared steps)", "sum", "shared", None),
                         ("schedule FoCa (CFG-weighted split)", "sum", "search", cfg_weights)]
        variants.append(("schedule FoCa min-max", "max", "search", None))
        if len(contexts) > 1:
            variants.append(("schedule FoCa min-max (shared steps)", "max", "shared", None))
        for family, objective, split, weights in variants:
            options = searches[objective].options(speedup, split=split, weights=weights)
            rows_meta.append({"family": family, "total": total, "steps": options["steps"]})
            methods.append((family, f"{family} {total}/{calls} calls",
                            dict(base, warmup_steps=0, policy="schedule", policy_options=options), None, n))
    for interval in ints(args.intervals):
        methods.append(("interval FoCa", f"interval FoCa N={interval}",
                        dict(base, warmup_steps=2, policy="interval", policy_options={"interval": interval}), None, n))
    if diffusers_can_cache(plain):
        from diffusers import TaylorSeerCacheConfig

        for interval in ints(args.intervals):
            methods.append(("diffusers TaylorSeerCache lite", f"diffusers TaylorSeerCache lite interval={interval}",
                            None, lambda k=interval: TaylorSeerCacheConfig(
                                cache_interval=k, disable_cache_before_step=3, taylor_factors_dtype=torch.float32,
                                use_lite_mode=True), n))
    for fewer in ints(args.fewer):
        methods.append(("fewer steps", f"fewer steps {fewer}", None, None, fewer))

    results = []
    for family, name, cache, factory, steps in methods:
        if keep and family not in keep:
            continue
        scores = []
        if cache is not None:
            cachedit.accelerate(plain, device="auto", cache=cache)
            counter.reset()
            for i, p in enumerate(evaluation):
                scores.append(psnr(plain(prompt=p, **call(n, i))[0], refs[p]))
            ideal = counter.plain * len(evaluation) / counter.executed()
            cachedit.disable(plain)
        elif factory is not None:  # the peer on a pipeline of its own
            pipe = load()
            pipe.transformer.enable_cache(factory())
            flops = 0
            for i, p in enumerate(evaluation):
                out, _, b = counted(pipe, p, call(n, i), blocks)
                flops += b
                scores.append(psnr(out, refs[p]))
            ideal = counter.plain * len(evaluation) / flops
        else:  # plain fewer steps against the full-step images
            for i, p in enumerate(evaluation):
                scores.append(psnr(plain(prompt=p, **call(steps, i))[0], refs[p]))
            ideal = n / steps
        row = {"family": family, "method": name, "ideal": ideal, "psnr_db": sum(scores) / len(scores)}
        results.append(row)
        print(f"{name}: ideal {ideal:.2f}x PSNR {row['psnr_db']:.2f} dB", flush=True)

    families = list(dict.fromkeys(r["family"] for r in results))
    table = ["| family | " + " | ".join(f"{t}x" for t in TARGETS) + " |", "|---|" + "---|" * len(TARGETS)]
    for f in families:
        pts = [(r["ideal"], r["psnr_db"]) for r in results if r["family"] == f]
        cells = [frontier_at(pts, t) for t in TARGETS]
        table.append(f"| {f} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    branch = searches["sum"] if len(contexts) > 1 else ScheduleSearch(_rows(recorded), "foca")
    estimate = {c: {k: round(branch.best(c, k)[0], 5) for k in range(3, n + 1, 2)} for c in branch.contexts}
    splits = {f"{t}x": branch.split(round(len(branch.contexts) * n / t)) for t in TARGETS}
    text = "\n".join(table) + "\n\nsearch split (computed steps per branch): " + json.dumps(splits)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.model}_p{len(evaluation)}" + ("_some" if keep else "")
    (out / f"sweep_{tag}.json").write_text(json.dumps({"args": vars(args), "contexts": contexts, "rows": results,
                                                       "schedules": rows_meta, "branch_estimate": estimate,
                                                       "branch_split": splits}, indent=1))
    (out / f"sweep_{tag}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
