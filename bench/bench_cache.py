"""Cache benchmark: uncached vs cached side by side in one run, on one model, prompts and seeds.

    python bench/bench_cache.py [--model reference|tiny] [--steps 28] [--repeats 3] [--out bench/out]

For each configuration: the fraction of block computations done (its inverse is the ideal
speedup), the measured speedup of the transformer calls and of the whole pipeline call, their
ratio to the ideal, and PSNR against the uncached output. Prints a markdown table and writes
cache.json and cache.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import cachedit

CONFIGS = {
    "uncached": None,
    "F1B0 t=0.05": dict(Fn=1, Bn=0, residual_diff_threshold=0.05, warmup_steps=4),
    "F1B0 t=0.10": dict(Fn=1, Bn=0, residual_diff_threshold=0.10, warmup_steps=4),
    "F1B0 t=0.20": dict(Fn=1, Bn=0, residual_diff_threshold=0.20, warmup_steps=4),
    "F1B0 t=0.20 mc3": dict(Fn=1, Bn=0, residual_diff_threshold=0.20, warmup_steps=4, max_continuous_cached_steps=3),
    "F1B0 t=0.20 TaylorSeer": dict(Fn=1, Bn=0, residual_diff_threshold=0.20, warmup_steps=4, calibrator="taylorseer"),
    "F1B0 t=0.20 FoCa": dict(Fn=1, Bn=0, residual_diff_threshold=0.20, warmup_steps=4, calibrator="foca"),
    "static mask fast": dict(Fn=1, Bn=0, residual_diff_threshold=0, warmup_steps=0, steps_mask="fast",
                             mask_mode="static"),
}


def load(model: str):
    if model == "reference":
        from cachedit.testing.reference import reference_call_kwargs, reference_pipeline

        return reference_pipeline(), lambda steps, seed: reference_call_kwargs(steps, seed), "a handwritten digit {}"
    from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

    return tiny_pipeline("flux"), lambda steps, seed: tiny_call_kwargs("flux", num_inference_steps=steps,
                                                                       seed=seed), "a photo of a cat {}"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.double().clamp(0, 1) - b.double().clamp(0, 1)) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


class TransformerTimer:
    """Wall time spent inside the transformer's forward (hooks, not patching)."""

    def __init__(self, transformer):
        self.total = 0.0
        transformer.register_forward_pre_hook(self._start)
        transformer.register_forward_hook(self._stop)

    def _start(self, *_):
        self.t0 = time.perf_counter()

    def _stop(self, *_):
        self.total += time.perf_counter() - self.t0


def run(model: str, steps: int, repeats: int, prompts: list[int]) -> list[dict]:
    pipe, call_kwargs, template = load(model)
    timer = TransformerTimer(pipe.transformer)
    rows, reference = [], {}
    for name, config in CONFIGS.items():
        if config is not None:
            cachedit.accelerate(pipe, device="cpu_ref", attention="torch_sdpa", cache=config)
        pipe(prompt=template.format(prompts[0]), **call_kwargs(steps, 0))  # warm up
        wall, inner, quality, fractions = [], [], [], []
        for p in prompts:
            for r in range(repeats):
                timer.total = 0.0
                start = time.perf_counter()
                out = pipe(prompt=template.format(p), **call_kwargs(steps, p))[0]
                wall.append(time.perf_counter() - start)
                inner.append(timer.total)
            if config is None:
                reference[p] = out
            else:
                quality.append(psnr(out, reference[p]))
                fractions.append(cachedit.summary(pipe)["cache"]["transformer"]["computed_fraction"])
        if config is not None:
            cachedit.disable(pipe)
        rows.append({"config": name, "settings": config, "wall_s": statistics.median(wall),
                     "transformer_s": statistics.median(inner),
                     "computed_fraction": statistics.mean(fractions) if fractions else 1.0,
                     "psnr_db": statistics.mean(quality) if quality else float("inf")})
    base = rows[0]
    for row in rows:
        row["ideal_speedup"] = 1.0 / row["computed_fraction"]
        row["speedup"] = base["wall_s"] / row["wall_s"]
        row["transformer_speedup"] = base["transformer_s"] / row["transformer_s"]
        row["transformer_speedup_over_ideal"] = row["transformer_speedup"] / row["ideal_speedup"]
    return rows


def table(rows: list[dict]) -> str:
    head = "| config | computed | ideal x | transformer x | measured/ideal | pipeline x | PSNR dB |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['config']} | {r['computed_fraction']:.2f} | {r['ideal_speedup']:.2f} | "
                     f"{r['transformer_speedup']:.2f} | {r['transformer_speedup_over_ideal']:.2f} | "
                     f"{r['speedup']:.2f} | {r['psnr_db']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=["reference", "tiny"], default="reference")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, nargs="+", default=[3, 7])
    parser.add_argument("--out", default="bench/out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = run(args.model, args.steps, args.repeats, args.prompts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "steps": args.steps, "repeats": args.repeats, "prompts": args.prompts,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / "cache.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    text = table(rows)
    (out / "cache.md").write_text(f"{meta}\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
