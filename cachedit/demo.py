"""`cachedit demo`: one pipeline run plain and accelerated, side by side, with a comparison table.

Until the trained reference model lands (its own issue), the demo runs the offline tiny FLUX
pipeline from `cachedit.testing.tiny`: random weights, so the images are noise and the numbers
show the mechanics (kernel routing, compile, exact disable), not image quality.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def _timed(pipe, kwargs_fn, repeats: int) -> tuple[torch.Tensor, float]:
    pipe("warm up", **kwargs_fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = pipe("a photo of a cat", **kwargs_fn()).images
        best = min(best, time.perf_counter() - start)
    return out, best


def run_demo(steps: int = 8, out: str = "out/demo", repeats: int = 3) -> int:
    import cachedit
    from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

    torch.set_num_threads(1)  # tiny models: intra-op threads only add OpenMP overhead
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    kwargs = lambda: tiny_call_kwargs("flux", num_inference_steps=steps)  # noqa: E731
    pipe = tiny_pipeline("flux")
    base, t_base = _timed(pipe, kwargs, repeats)
    cachedit.accelerate(pipe, device="auto", compile=True)
    fast, t_fast = _timed(pipe, kwargs, repeats)
    info = cachedit.summary(pipe)
    cachedit.disable(pipe)
    restored = pipe("a photo of a cat", **kwargs()).images
    rows = [
        ("baseline", f"{t_base * 1000:.1f}", "1.00", "-", "-"),
        (f"accelerated ({info['backend']}, compile, {info['attention']['kernels']['transformer'][0]})",
         f"{t_fast * 1000:.1f}", f"{t_base / t_fast:.2f}", f"{_psnr(fast, base):.1f}",
         f"{(fast - base).abs().max().item():.2e}"),
    ]
    header = ("run", "ms/image", "speedup", "PSNR dB", "max abs diff")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"disable() restores bitwise-identical output: {torch.equal(restored, base)}")
    record = {"steps": steps, "baseline_s": t_base, "accelerated_s": t_fast, "speedup": t_base / t_fast,
              "psnr_db": _psnr(fast, base), "bitwise_after_disable": torch.equal(restored, base), "summary": info}
    (outdir / "demo.json").write_text(json.dumps(record, indent=2, default=str))
    try:
        from PIL import Image

        grid = torch.cat([base[0], fast[0]], dim=-1).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0)
        Image.fromarray(grid.numpy()).resize((grid.shape[1] * 8, grid.shape[0] * 8), Image.NEAREST).save(
            outdir / "baseline_vs_accelerated.png")
    except ImportError:
        pass
    print(f"wrote {outdir / 'demo.json'} and {outdir / 'baseline_vs_accelerated.png'}")
    return 0 if torch.equal(restored, base) else 1
