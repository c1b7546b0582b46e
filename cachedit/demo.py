"""`cachedit demo`: the shipped reference model, plain and accelerated, side by side.

Generates the ten digits with the trained reference FLUX pipeline, uncached, then with two cache
configurations, and prints time, measured speedup (a median of ratios, each accelerated call timed
right after a plain one on a second, never-accelerated pipeline), ideal speedup, cached steps and
PSNR / SSIM against the uncached images; saves the image grids side by side and a JSON record.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

CONFIGS = {
    "DBCache F1B0 t=0.2 +TaylorSeer": dict(Fn=1, Bn=0, residual_diff_threshold=0.2, warmup_steps=2,
                                           calibrator="taylorseer"),
    "forecast t=0.2 +FoCa (cachedit's own)": dict(Fn=1, Bn=0, residual_diff_threshold=0.2, warmup_steps=2,
                                                  policy="forecast", calibrator="foca"),
}


def _grid(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> one row (C, H, N*W) with a 1-pixel gray gap."""
    gap = torch.full((images.shape[1], images.shape[2], 1), 0.5)
    parts = []
    for img in images:
        parts += [img.clamp(0, 1), gap]
    return torch.cat(parts[:-1], dim=-1)


def run_demo(steps: int = 28, out: str = "out/demo", repeats: int = 3) -> int:
    import cachedit
    from tqdm.auto import tqdm

    from .benchmarking.measure import Clock
    from .generate import save_png
    from .metrics import psnr, ssim
    from .testing.reference import digit_prompt, reference_call_kwargs, reference_pipeline

    torch.set_num_threads(1)  # a 3M-parameter model: intra-op threads only add OpenMP overhead
    clock = Clock("wall")
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    prompts = [digit_prompt(d) for d in range(10)]
    plain, pipe = reference_pipeline(), reference_pipeline()
    progress = tqdm(total=len(CONFIGS) * (1 + 2 * repeats) + 2, desc="demo", unit="call", leave=False)

    def generate(p):
        start = clock.now()
        images = p(prompt=prompts, **reference_call_kwargs(steps, seed=0)).images
        progress.update()
        return images, clock.now() - start

    base, _ = generate(plain)
    rows, grids, plain_times = [], [_grid(base)], []
    for name, config in CONFIGS.items():
        cachedit.accelerate(pipe, device="auto", cache=config)
        images, _ = generate(pipe)  # warm-up and the images
        ratios = []
        for _ in range(repeats):  # interleaved: plain, accelerated, plain, ...
            t_plain, t_fast = generate(plain)[1], generate(pipe)[1]
            ratios.append(t_fast / t_plain)
            plain_times.append(t_plain)
        info = cachedit.summary(pipe)["cache"]["transformer"]
        cached = info["stacks"][0]["contexts"]["cond"]["cached_steps"]
        rows.append({"run": name, "seconds": statistics.median(ratios) * statistics.median(plain_times),
                     "speedup": 1 / statistics.median(ratios), "ideal_speedup": info["ideal_speedup"],
                     "cached_steps": f"{len(cached)}/{steps}", "psnr_db": psnr(images, base),
                     "ssim": ssim(images, base)})
        grids.append(_grid(images))
        cachedit.disable(pipe)
    restored, _ = generate(pipe)
    progress.close()
    rows.insert(0, {"run": "uncached", "seconds": statistics.median(plain_times), "speedup": 1.0,
                    "ideal_speedup": 1.0, "cached_steps": "-", "psnr_db": float("inf"), "ssim": 1.0})

    header = ("run", "s / 10 images", "speedup", "ideal", "cached steps", "PSNR dB", "SSIM")
    table = [header] + [(r["run"], f"{r['seconds']:.2f}", f"{r['speedup']:.2f}", f"{r['ideal_speedup']:.2f}",
                         r["cached_steps"], f"{r['psnr_db']:.1f}", f"{r['ssim']:.4f}") for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"speedup: median of {repeats} paired ratios, each accelerated call timed right after a plain one")
    exact = torch.equal(restored, base)
    print(f"disable() restores bitwise-identical output: {exact}")
    save_png(torch.cat(grids, dim=-2).unsqueeze(0), outdir / "uncached_vs_cached.png", scale=4)
    (outdir / "demo.json").write_text(json.dumps({"steps": steps, "rows": rows, "bitwise_after_disable": exact,
                                                  "rows_in_png": ["uncached", *CONFIGS]}, indent=2, default=str))
    print(f"wrote {outdir / 'uncached_vs_cached.png'} (rows: uncached, {', '.join(CONFIGS)}) and {outdir / 'demo.json'}")
    return 0 if exact else 1
