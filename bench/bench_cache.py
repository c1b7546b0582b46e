"""Cache benchmark: overhead, efficiency and parity, each against the plain pipeline in one run.

    python bench/bench_cache.py [--model reference] [--steps 28] [--repeats 3] [--prompts 10] [--out bench/out/cache]

Three parts, every time a median of paired ratios (plain, accelerated, plain, ...), CPU time:
1. overhead: caches that never skip, cachedit's and the peers' (cache-dit, diffusers FirstBlockCache at
   threshold 0), on a 9-block FLUX (hidden 128, random weights) and on the model (the reference by default);
2. efficiency (true CFG, as the model is meant to run): measured / ideal speedup of cachedit's
   configurations and the peers' (cache-dit DBCache +-TaylorSeer, diffusers FirstBlockCache and
   TaylorSeerCache lite / full), ideal = executed transformer-block FLOPs;
3. parity (no CFG: cache-dit 1.5.3 shares one state between CFG branches): cachedit and cache-dit at
   identical settings, whether their outputs are identical and cachedit's time / cache-dit's.
4. batch (only with `--parts batch`; quality, no timing): the prompts in one batch against each prompt
   run alone, batch-level (cachedit's default, cache-dit, diffusers FirstBlockCache) and per-sample
   (`CacheConfig(per_sample=True)`) decisions; see cachedit/benchmarking/batch.py.
"""

from __future__ import annotations

import argparse

import torch

from cachedit.cli import quiet_third_party
from cachedit.benchmarking import cachedit_method, diffusers_method, model_and_call, run_bench, save_table
from cachedit.benchmarking.methods import dbcache_pair, overhead_methods, peer_overhead_methods
from cachedit.benchmarking.report import headline, headline_text, markdown


def efficiency_methods():
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    methods = [*overhead_methods()]
    for t in (0.1, 0.2):
        methods += dbcache_pair(t, taylorseer=False) + dbcache_pair(t, taylorseer=True)
    methods.append(cachedit_method("step mask fast +TaylorSeer", Fn=1, Bn=0, residual_diff_threshold=0,
                                   warmup_steps=0, steps_mask="fast", mask_mode="static", calibrator="taylorseer"))
    methods.append(diffusers_method("diffusers FirstBlockCache t=0.2", lambda: FirstBlockCacheConfig(threshold=0.2),
                                    threshold=0.2))
    for lite in (True, False):
        methods.append(diffusers_method(
            "diffusers TaylorSeerCache interval=3" + (" lite" if lite else ""),
            lambda lite=lite: TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=3,
                                                    taylor_factors_dtype=torch.float32, use_lite_mode=lite),
            cache_interval=3, lite=lite))
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="reference")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=10, help="how many of the model's prompts")
    parser.add_argument("--parts", default="overhead,efficiency,parity")
    parser.add_argument("--out", default="bench/out/cache")
    args = parser.parse_args()
    quiet_third_party()
    torch.set_num_threads(1)
    parts = set(args.parts.split(","))
    payload, text = {"model": args.model, "steps": args.steps, "repeats": args.repeats}, []

    def part(name, model, methods, cfg=True):
        load, call, prompts = model_and_call(model, cfg=cfg)
        rows = run_bench(load, call, prompts[:args.prompts], args.steps, args.repeats, methods=methods,
                         log=lambda *a: None)
        payload[name] = {"model": model, "cfg": cfg, "headline": headline(rows), "rows": rows}
        text.extend([f"## {name}: {model}, {'true CFG' if cfg else 'no CFG'}", headline_text(headline(rows)), "",
                     markdown(rows), ""])

    if "overhead" in parts:
        for model in ("flux9", args.model):
            part(f"overhead: {model}", model, overhead_methods() + peer_overhead_methods())
    if "efficiency" in parts:
        part("efficiency", args.model, efficiency_methods())
    if "parity" in parts:
        part("parity with cache-dit", args.model,
             [*overhead_methods()[:1]] + [m for t in (0.1, 0.2) for ts in (False, True) for m in dbcache_pair(t, ts)],
             cfg=False)
    if "batch" in parts:
        from cachedit.benchmarking.batch import batch_markdown, run_batch_bench

        load, call, prompts = model_and_call(args.model, cfg=True)
        rows = run_batch_bench(load, call, prompts[:args.prompts], args.steps, log=lambda *a: None)
        payload["batch"] = {"model": args.model, "cfg": True, "rows": rows}
        text.extend([f"## batch: {args.model}, true CFG, {len(prompts[:args.prompts])} prompts in one batch",
                     batch_markdown(rows), ""])
    save_table(args.out, "cache", payload, "\n".join(text))


if __name__ == "__main__":
    main()
