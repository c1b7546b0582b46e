"""`cachedit bench`: cache policies and peers side by side on one model, prompts and seeds.

Every method is timed against the plain pipeline, interleaved (see `benchmarking.measure`), with
FLOP-counted ideal speedups and PSNR / SSIM against the plain images. Writes JSON, a markdown table
with the headline ratios (overhead, measured / ideal, time against cache-dit) and a PNG frontier.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .benchmarking import Clock, model_and_call, run_bench, write
from .benchmarking.report import headline, headline_text, markdown


def add_arguments(p) -> None:
    from .arguments import model_source, positive_int, writable_dir

    p.add_argument("--model", default="reference", type=model_source("reference", "reference-sd3", "tiny", "flux9"),
                   help="'reference' / 'reference-sd3' (built in, trained FLUX / SD3), 'flux9' (random 9-block FLUX), "
                        "'tiny' (random FLUX) or a folder")
    p.add_argument("--steps", type=positive_int, default=28)
    p.add_argument("--repeats", type=positive_int, default=3, help="timed pairs (plain, accelerated) per prompt")
    p.add_argument("--prompts", nargs="+", default=None, help="default: digits 0-9 prompts for the reference model")
    p.add_argument("--no-cfg", action="store_true", help="reference model: no true CFG (one call per step)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="process CPU time (default) or wall time")
    p.add_argument("--out", default="bench/out/frontier", type=writable_dir)


def run(args) -> int:
    torch.set_num_threads(1)  # the small reference model: intra-op threads only add noise
    load, call, prompts = model_and_call(args.model, cfg=not args.no_cfg)
    prompts = args.prompts or prompts
    rows = run_bench(load, call, prompts, args.steps, args.repeats, clock=Clock(args.clock))
    meta = {"model": args.model, "steps": args.steps, "repeats": args.repeats, "prompts": prompts,
            "cfg": not args.no_cfg, "clock": args.clock, "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    write(rows, Path(args.out), meta)
    print(headline_text(headline(rows)))
    print(markdown(rows))
    print(f"wrote {args.out}/bench.json, bench.md, bench.png")
    return 0
