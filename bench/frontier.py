"""The quality frontier on the shipped reference models: cachedit against its peers and fewer steps.

    python bench/frontier.py [--model reference reference-sd3] [--prompts 8] [--steps 28] [--quick] [--lpips]
                             [--policies ...] [--calibrators ...] [--out bench/out/frontier]

Quality only, no timing (see cachedit/benchmarking/quality_frontier.py): every registered cachedit policy x
calibrator (each policy's `tune_space`), cache-dit DBCache +-TaylorSeer, diffusers FirstBlockCache,
TaylorSeerCache lite / full and MagCache (where the model's transformer can take them), and the plain
pipeline at fewer steps; prompt i with seed i. Per model: frontier_<model>.json (every point, what was
left out and why), frontier_<model>.md (the table per target, margins in dB, every family's frontier)
and frontier_<model>.png. `--lpips` needs torchvision's pretrained AlexNet weights in its cache (they
are downloaded otherwise); without them it stops with a message before any run.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from cachedit.cli import quiet_third_party


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["reference", "reference-sd3"],
                        help="'reference', 'reference-sd3', 'tiny' or a pipeline folder")
    parser.add_argument("--prompts", type=int, default=8, help="how many of the model's prompts (seed i for prompt i)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--quick", action="store_true", help="two settings per family, one calibration run")
    parser.add_argument("--lpips", action="store_true", help="also LPIPS (needs the AlexNet backbone weights)")
    parser.add_argument("--no-screen", action="store_true", help="run every cachedit setting on every prompt")
    parser.add_argument("--policies", nargs="+", default=None, help="cachedit policies (default: every registered)")
    parser.add_argument("--calibrators", nargs="+", default=None, help="'none' or registered names (default: all)")
    parser.add_argument("--out", default="bench/out/frontier")
    parser.add_argument("--parts", default="fewer-steps,cachedit,peers", help="comma-separated, of these")
    parser.add_argument("--peers", nargs="+", default=None, help="only peer families whose names contain one of these")
    parser.add_argument("--tag", default="", help="suffix of the output files (runs of some parts, to merge)")
    parser.add_argument("--replot", action="store_true", help="only the tables and plots, from the saved JSON")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="saved JSON files of runs of some parts on one model: merged, then tables and plots")
    args = parser.parse_args(argv)
    if args.merge:
        return merge_saved(Path(args.out), [Path(f) for f in args.merge])
    if args.replot:
        return replot(Path(args.out), args.model)
    quiet_third_party()
    torch.set_num_threads(1)
    from cachedit.benchmarking.quality_frontier import Scorer, run_frontier
    from cachedit.benchmarking.methods import model_and_call

    if args.lpips:
        Scorer(lpips=True)  # fails here, before any run, where the weights are missing
    calibrators = None if args.calibrators is None else [None if c == "none" else c for c in args.calibrators]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model in args.model:
        load, call, prompts = model_and_call(model)
        prompts = prompts[: args.prompts]
        stem = "frontier_" + Path(model).name + (f"_{args.tag}" if args.tag else "")
        partial = out / f"{stem}.partial.json"  # every point so far, while it runs
        result = run_frontier(load, call, prompts, args.steps, quick=args.quick, lpips=args.lpips,
                              log=lambda line: print(line, flush=True),
                              screen=False if args.no_screen else None, policies=args.policies,
                              calibrators=calibrators, progress=lambda rows: partial.write_text(json.dumps(rows)),
                              parts=tuple(args.parts.split(",")), peers=args.peers)
        partial.unlink(missing_ok=True)
        meta = {"model": model, "prompts": prompts, "seeds": list(range(len(prompts))), "steps": args.steps,
                "quick": args.quick, "policies": args.policies, "calibrators": args.calibrators, "parts": args.parts, "peers": args.peers, "date": datetime.date.today().isoformat(),
                "torch": torch.__version__}
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, **result}, indent=1, default=str))
        report(out, stem, meta, result)


def report(out: Path, stem: str, meta: dict, result: dict) -> None:
    """frontier_<model>.md and .png from one model's result, and the table printed."""
    from cachedit.benchmarking.quality_frontier import family_table, plot, table

    points, n = result["points"], len(meta["prompts"])
    left_out = "".join(f"- left out: {r}\n" for r in result.get("left_out", []))
    text = (f"## {meta['model']}: {n} prompts, {meta['steps']} steps ({meta['date']})\n\n"
            f"{table(points)}\n\n{left_out}\n### every family's frontier (PSNR dB)\n\n{family_table(points)}\n")
    (out / f"{stem}.md").write_text(text)
    plot(points, out / f"{stem}.png", f"{meta['model']}: {n} prompts, {meta['steps']} steps")
    print(text, flush=True)


def replot(out: Path, models: list[str]) -> None:
    """Tables and plots again from the saved JSON, nothing run."""
    for model in models:
        stem = "frontier_" + Path(model).name
        saved = json.loads((out / f"{stem}.json").read_text())
        report(out, stem, saved["meta"], saved)



def merge_saved(out: Path, files: list[Path]) -> None:
    """Runs of some parts on one model (same prompts, seeds and steps) as one result."""
    from cachedit.benchmarking.quality_frontier import merge

    saved = [json.loads(f.read_text()) for f in files]
    metas = [s["meta"] for s in saved]
    for key in ("model", "prompts", "seeds", "steps"):
        if len({json.dumps(m[key]) for m in metas}) != 1:
            raise SystemExit(f"--merge: the runs differ in {key}; only runs on the same model, prompts, seeds and "
                             "steps merge")
    meta = {**metas[0], "parts": [m.get("parts") for m in metas], "policies_by_run": [m.get("policies") for m in metas],
            "merged_from": [str(f) for f in files]}
    result = merge(saved)
    stem = "frontier_" + Path(meta["model"]).name
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, **result}, indent=1, default=str))
    report(out, stem, meta, result)


if __name__ == "__main__":
    main()
