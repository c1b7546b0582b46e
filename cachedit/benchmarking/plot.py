"""The quality/speed frontier as a PNG (matplotlib, when installed)."""

from __future__ import annotations

from pathlib import Path


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "ideal_speedup", "ideal speedup (FLOPs)"),
                           (axes[1], "speedup", "measured pipeline speedup (paired with plain)")):
        for family in sorted({r["family"] for r in rows} - {"uncached"}):
            pts = sorted((r[key], min(r["psnr_db"], 60)) for r in rows if r["family"] == family)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=family)
        ax.set_xlabel(label)
        ax.set_ylabel("PSNR vs uncached (dB)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
