"""Quality and cost metrics: PSNR / SSIM against a reference image (torchmetrics), FLOPs of one
transformer call (torch.utils.flop_counter), and the fraction of block computations a cache did."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def _as_images(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float in [0, 1]; video frames (N, F, C, H, W) are folded into the batch."""
    x = x.detach().float().clamp(0, 1)
    if x.dim() == 5:
        x = x.flatten(0, 1)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    return x


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1]; inf when identical."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = _as_images(image), _as_images(reference)
    if torch.equal(a, b):
        return float("inf")
    return peak_signal_noise_ratio(a, b, data_range=1.0).item()


def ssim(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Structural similarity for images in [0, 1] (1.0 when identical). Images smaller than the
    11-pixel Gaussian window use a window that fits."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = _as_images(image), _as_images(reference)
    kernel = min(11, min(a.shape[-2:]) // 2 * 2 - 1)
    return structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=kernel).item()


def transformer_flops(transformer: torch.nn.Module, *args, **kwargs) -> int:
    """FLOPs of one transformer call with these arguments, counted by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        transformer(*args, **kwargs)
    return counter.get_total_flops()


def computed_fraction(summary: dict) -> float | None:
    """Fraction of transformer block computations actually done in the last call (1.0 uncached);
    the ideal speedup is its inverse."""
    cache = summary.get("cache") if summary.get("accelerated") else None
    if not cache:
        return 1.0
    done = total = 0
    for name, report in cache.items():
        if name == "config":
            continue
        for stack in report["stacks"]:
            for ctx in stack["contexts"].values():
                done += ctx["blocks_computed"]
                total += ctx["blocks_total"]
    return done / total if total else None
