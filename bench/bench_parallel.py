"""Parallel benchmark: weight memory per rank and time per denoising step on 1, 2 and 4 local gloo
ranks, for tensor, CFG, context and hybrid parallelism, on the shipped reference model.

    python bench/bench_parallel.py [--steps 6] [--repeats 2] [--worlds 1 2 4] [--out bench/out/parallel]

Per rank: the transformer's weight bytes (storage of its parameters and buffers, what sharding
shrinks), the text encoders' when they are sharded, and peak resident memory of the process
(on a CPU this is dominated by torch itself, so it moves much less than the weights). Time per
step = (time of an N-step call - time of a 2-step call) / (N - 2), best of `--repeats`, the
slowest rank's, so text encoding and VAE decoding cancel out. Every configuration's image is
compared with the one-process image (max abs diff; images in [0, 1]).

This machine has 2 CPU cores shared with other work and gloo moves tensors through the loopback
device: 2 ranks can at best halve the transformer's work, 4 ranks oversubscribe the cores, so the
times show overheads and communication cost here, not the scaling a multi-GPU node would give.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import cachedit
from cachedit.benchmarking import save_table
from cachedit.quant.linear import weight_bytes
from cachedit.testing.distributed import run_distributed
from cachedit.testing.reference import digit_prompt, reference_call_kwargs, reference_pipeline

CONFIGS = {
    1: [("single", None)],
    2: [("tensor 2", dict(tensor=2)), ("tensor 2 + text encoders", dict(tensor=2, text_encoder=True)),
        ("cfg 2", dict(cfg=2)), ("ulysses 2", dict(ulysses=2)), ("ulysses 2 + vae", dict(ulysses=2, vae=True))],
    4: [("tensor 4", dict(tensor=4)), ("ulysses 2 x tensor 2", dict(ulysses=2, tensor=2)),
        ("ulysses 4", dict(ulysses=4))],
}


def _call(pipe, steps):
    t = time.perf_counter()
    out = pipe(prompt=digit_prompt(3), **reference_call_kwargs(num_inference_steps=steps)).images
    return time.perf_counter() - t, out


def _text_encoder_bytes(pipe) -> int:
    return sum(weight_bytes(getattr(pipe, n)) for n in ("text_encoder", "text_encoder_2")
               if getattr(pipe, n, None) is not None)


def _rank(rank, world, steps, repeats, configs):
    rows = []
    for name, parallel in configs:
        pipe = reference_pipeline()
        full = weight_bytes(pipe.transformer), _text_encoder_bytes(pipe)
        try:
            cachedit.accelerate(pipe, device="cpu_ref", parallel=parallel)
        except (ValueError, NotImplementedError) as exc:  # a mode this build does not offer
            rows.append(dict(config=name, world=world, parallel=parallel, error=str(exc).splitlines()[0]))
            continue
        _call(pipe, 2)  # warm up
        best = min(_call(pipe, steps)[0] - _call(pipe, 2)[0] for _ in range(repeats)) / (steps - 2)
        image = _call(pipe, steps)[1]
        rows.append(dict(config=name, world=world, parallel=parallel, step_s=best, image=image,
                         transformer_bytes=weight_bytes(pipe.transformer), transformer_full=full[0],
                         text_encoder_bytes=_text_encoder_bytes(pipe), text_encoder_full=full[1],
                         peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
        cachedit.disable(pipe)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", default="bench/out/parallel")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for world in args.worlds:
        configs = CONFIGS[world]
        if world == 1:
            rows.extend(_rank(0, 1, args.steps, args.repeats, configs))
            continue
        per_rank = run_distributed(_rank, world, args=(args.steps, args.repeats, configs))
        for i, row in enumerate(per_rank[0]):
            if "error" not in row:
                row["step_s"] = max(r[i]["step_s"] for r in per_rank)  # a step ends when the slowest rank ends
                row["transformer_bytes_max"] = max(r[i]["transformer_bytes"] for r in per_rank)
                row["ranks_agree"] = max((r[i]["image"] - row["image"]).abs().max().item() for r in per_rank)
            rows.append(row)
    single = next(r for r in rows if r["world"] == 1)
    lines = ["reference FLUX (2 double + 6 single blocks, 4 heads of 32), 28-step model run for "
             f"{args.steps} steps, true CFG, fp32; 1 thread per rank, 2-core CPU, gloo", "",
             "| ranks | config | transformer weights / rank | x of one process | text encoders / rank | "
             "peak RSS MiB | ms / step | x vs 1 rank | max abs diff vs 1 process |", "|" + "---|" * 9]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['world']} | {r['config']} | not run: {r['error']} |" + " |" * 6)
            continue
        diff = (r["image"] - single["image"]).abs().max().item()
        r["max_abs_diff"] = diff
        mem = r.get("transformer_bytes_max", r["transformer_bytes"])
        lines.append(f"| {r['world']} | {r['config']} | {mem / 2**20:.2f} MiB | {mem / r['transformer_full']:.3f} | "
                     f"{r['text_encoder_bytes'] / r['text_encoder_full']:.3f} | {r['peak_rss_mib']:.0f} | "
                     f"{1000 * r['step_s']:.1f} | {single['step_s'] / r['step_s']:.2f} | {diff:.2e} |")
    for r in rows:
        r.pop("image", None)
    save_table(args.out, "parallel", {"steps": args.steps, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
