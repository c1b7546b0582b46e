"""Cache benchmark: uncached vs cachedit configurations side by side in one run.

    python bench/bench_cache.py [--model reference|tiny|FOLDER] [--steps 28] [--repeats 3] [--out bench/out/cache]

Reports, per configuration, the fraction of block computations done (its inverse is the
ideal speedup), the measured speedup of the transformer calls, their ratio (measured / ideal),
the pipeline speedup and PSNR / SSIM against uncached. `cachedit bench` adds the peers.
"""

from __future__ import annotations

import argparse
import torch

from cachedit.benchmark import Method, save_table, _cachedit, model_and_call, run_bench

CONFIGS = {
    "F1B0 t=0.05": dict(Fn=1, Bn=0, residual_diff_threshold=0.05, warmup_steps=4),
    "F1B0 t=0.10": dict(Fn=1, Bn=0, residual_diff_threshold=0.10, warmup_steps=4),
    "F1B0 t=0.20 mc3": dict(Fn=1, Bn=0, residual_diff_threshold=0.20, warmup_steps=4, max_continuous_cached_steps=3),
    "F1B0 t=0.20 mc3 TaylorSeer": dict(Fn=1, Bn=0, residual_diff_threshold=0.20, warmup_steps=4,
                                       max_continuous_cached_steps=3, calibrator="taylorseer"),
    "static mask fast": dict(Fn=1, Bn=0, residual_diff_threshold=0, warmup_steps=0, steps_mask="fast",
                             mask_mode="static"),
    "static mask ultra": dict(Fn=1, Bn=0, residual_diff_threshold=0, warmup_steps=0, steps_mask="ultra",
                              mask_mode="static"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="reference")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/out/cache")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load, call, prompts = model_and_call(args.model)
    methods = [Method("uncached", "uncached", lambda p: None, lambda p: None)]
    methods += [_cachedit(name, **cfg) for name, cfg in CONFIGS.items()]
    rows = run_bench(load, call, prompts[:3], args.steps, args.repeats, methods=methods, log=lambda *a: None)
    head = "| config | computed | ideal x (blocks) | transformer x | measured/ideal | pipeline x | PSNR dB | SSIM |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        fraction = r["computed_fraction"] or 1.0
        lines.append(f"| {r['method']} | {fraction:.2f} | {1 / fraction:.2f} | {r['transformer_speedup']:.2f} | "
                     f"{r['transformer_speedup'] * fraction:.2f} | {r['speedup']:.2f} | {r['psnr_db']:.2f} | "
                     f"{r['ssim']:.4f} |")
    save_table(args.out, "cache", {"model": args.model, "steps": args.steps, "rows": rows}, "\n".join(lines))

if __name__ == "__main__":
    main()
