"""Benchmark rows as tables, headline ratios and files (JSON, markdown, PNG)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

# Rows that skip little say nothing about how well skipped work turns into time.
MIN_IDEAL_FOR_EFFICIENCY = 1.5


def markdown(rows: list[dict]) -> str:
    head = ("| method | ideal x (blocks) | ideal x (FLOPs) | transformer x | measured/ideal | pipeline x | "
            "p50 s | PSNR dB | SSIM |")
    lines = [head, "|" + "---|" * 9]
    for r in sorted(rows, key=lambda r: (r["family"] != "uncached", r["family"], r["ideal_speedup"])):
        p50 = r.get("latency_s", {}).get("p50")
        lines.append(f"| {r['method']} | {r['block_ideal_speedup'] or 0:.2f} | {r['ideal_speedup']:.2f} | "
                     f"{r['transformer_speedup']:.2f} | {r['measured_over_ideal']:.2f} | {r['speedup']:.2f} | "
                     f"{'-' if p50 is None else f'{p50:.3f}'} | {r['psnr_db']:.2f} | {r['ssim']:.4f} |")
    return "\n".join(lines)


def frontier(rows: list[dict], family: str) -> list[dict]:
    """The family's Pareto-best rows: none both faster (ideal) and higher PSNR."""
    mine = [r for r in rows if r["family"] == family]
    return [r for r in mine if not any(o["ideal_speedup"] >= r["ideal_speedup"] and o["psnr_db"] > r["psnr_db"]
                                       and o is not r for o in mine)]


def headline(rows: list[dict]) -> dict:
    """The three ratios a reader checks first, all against the plain pipeline of the same run:
    - overhead: time of caches that never skip / plain time (1.0 is free), cachedit's and the peers';
    - efficiency: median measured / ideal speedup per family, over rows with ideal >= 1.5;
    - vs cache-dit: cachedit's time / cache-dit's at identical settings, with whether outputs were identical."""
    overhead = {r["method"]: r["time_ratio"] for r in rows if r.get("role") == "overhead"}
    peer_overhead = {r["method"]: r["time_ratio"] for r in rows if r.get("role") == "peer overhead"}
    efficiency = {}
    for family in sorted({r["family"] for r in rows} - {"uncached"}):
        values = [r["measured_over_ideal"] for r in rows if r["family"] == family
                  and (r["block_ideal_speedup"] or r["ideal_speedup"]) >= MIN_IDEAL_FOR_EFFICIENCY]
        if values:
            efficiency[family] = statistics.median(values)
    by_name = {r["method"]: r for r in rows}
    parity = {}
    for r in rows:
        theirs = by_name.get(f"cache-dit {r['method']}") if r["family"] == "cachedit" else None
        if theirs is not None:
            parity[r["method"]] = {"time_vs_cache_dit": r["time_ratio"] / theirs["time_ratio"],
                                   "identical_outputs": r.get("images_sha1") == theirs.get("images_sha1")}
    peers = [v for k, v in efficiency.items() if k != "cachedit"]
    lead = min(peer_overhead.values()) - max(overhead.values()) if overhead and peer_overhead else None
    return {"overhead": overhead, "max_overhead": max(overhead.values(), default=None),
            "peer_overhead": peer_overhead, "overhead_lead": lead,
            "measured_over_ideal": efficiency,
            "efficiency_lead": efficiency["cachedit"] - max(peers) if "cachedit" in efficiency and peers else None,
            "vs_cache_dit": parity}


def headline_text(summary: dict) -> str:
    lines = []
    if summary["max_overhead"] is not None:
        lines.append(f"overhead with nothing skipped: {summary['max_overhead']:.3f}x the plain pipeline's time "
                     f"(worst of {len(summary['overhead'])})")
    for name, value in summary.get("peer_overhead", {}).items():
        lines.append(f"overhead with nothing skipped, {name}: {value:.3f}x the plain pipeline's time")
    if summary.get("overhead_lead") is not None:
        lines.append(f"the least peer overhead minus cachedit's worst: {summary['overhead_lead']:+.3f}")
    for family, value in summary["measured_over_ideal"].items():
        lines.append(f"measured / ideal speedup, {family}: {value:.3f}")
    if summary["efficiency_lead"] is not None:
        lines.append(f"cachedit's measured / ideal minus the best peer's: {summary['efficiency_lead']:+.3f}")
    for name, p in summary["vs_cache_dit"].items():
        lines.append(f"{name}: {p['time_vs_cache_dit']:.3f}x cache-dit's time, outputs "
                     f"{'identical' if p['identical_outputs'] else 'differ'}")
    return "\n".join(lines)


def save_table(out: str | Path, stem: str, payload: dict, text: str) -> None:
    """Write `stem`.json (the payload) and `stem`.md (the table) under `out`, and print the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / f"{stem}.md").write_text(text + "\n")
    print(text)


def write(rows: list[dict], out: Path, meta: dict) -> None:
    from .plot import plot

    out.mkdir(parents=True, exist_ok=True)
    summary = headline(rows)
    (out / "bench.json").write_text(json.dumps({"meta": meta, "headline": summary, "rows": rows}, indent=2,
                                               default=str))
    (out / "bench.md").write_text(f"{json.dumps(meta)}\n\n{headline_text(summary)}\n\n{markdown(rows)}\n")
    plot(rows, out / "bench.png")
