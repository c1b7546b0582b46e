"""Quantization benchmark: every scheme on one model, side by side with the unquantized baseline.

    python bench/bench_quant.py [--model reference|tiny|FOLDER] [--steps 28] [--dtype bfloat16]

Per scheme: PSNR / SSIM against the unquantized output (same dtype), the transformer's weight
memory against its unquantized weights, and latency. Runs through cpu_ref's exact emulation
here, so latency says nothing about a GPU; quality and memory carry over.
"""

from __future__ import annotations

import argparse
import torch

import cachedit
from cachedit.benchmarking import Method, model_and_call, run_bench, save_table
from cachedit.quant.linear import weight_bytes

SCHEMES = {
    "fp8 per-tensor": dict(scheme="fp8", granularity="tensor"),
    "fp8 per-row": dict(scheme="fp8", granularity="row"),
    "int8 per-tensor": dict(scheme="int8", granularity="tensor"),
    "int8 per-row": dict(scheme="int8", granularity="row"),
    "int8 weight-only": dict(scheme="int8", granularity="row", weight_only=True),
    "fp8 per-row, modulation kept in float": dict(scheme="fp8", granularity="row",
                                                  exclude=("*embed*", "proj_out", "*norm*")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="reference")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--out", default="bench/out/quant")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    load, call, prompts = model_and_call(args.model)
    memory = {}

    def loader():
        return load().to(dtype)

    def method(name, quant):
        def apply(pipe):
            cachedit.accelerate(pipe, device="cpu_ref", quantize=quant)
            memory[name] = weight_bytes(pipe.transformer)
        return Method("quant", name, apply, cachedit.disable, quant)

    memory["uncached"] = weight_bytes(loader().transformer)
    methods = [method(name, quant) for name, quant in SCHEMES.items()]
    rows = run_bench(loader, call, prompts[:4], args.steps, 1, methods=methods, log=lambda *a: None)
    lines = [f"| scheme ({args.dtype} model) | weight memory vs unquantized | PSNR dB | SSIM | time vs unquantized |",
             "|---|---|---|---|---|"]
    for r in rows:
        r["weight_bytes"] = memory[r["method"]]
        r["memory_ratio"] = memory[r["method"]] / memory["uncached"]
        lines.append(f"| {r['method']} | {r['memory_ratio']:.2f} | {r['psnr_db']:.2f} | {r['ssim']:.4f} | "
                     f"{r['time_ratio']:.2f} |")
    save_table(args.out, "quant", {"model": args.model, "dtype": args.dtype, "rows": rows}, "\n".join(lines))

if __name__ == "__main__":
    main()
