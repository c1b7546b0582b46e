"""The quality frontier: every registered cachedit policy x calibrator against the peers and fewer steps.

Quality only (no timing: the machines are shared). Per method, its ideal speedup (the plain pipeline's
executed transformer-block FLOPs over the method's; for fewer steps, full steps / steps) and its mean
PSNR / SSIM (and LPIPS where backbone weights exist) against the plain full-step images. cachedit's
candidates come from the live registries (`cachedit.tune.search_space`: each policy's `tune_space`
crossed with every calibrator), so a newly registered policy or calibrator is swept without editing
the bench. Each family's Pareto frontier is interpolated linearly between its settings (`frontier_at`),
never extrapolated, so the grid's spacing does not decide.

With many candidates, every family is first screened on the first prompt alone, at its first, middle and
last setting, and only the families among the best at some target run their whole grid on all prompts; the
screen's points are kept in the output, marked.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

TARGETS = (2.0, 2.5, 3.0, 4.0, 5.0)
FEWER_STEPS_FRACTIONS = (1 / 2, 1 / 2.55, 1 / 3.1, 1 / 4, 1 / 4.7, 1 / 5.6)
SCREEN_KEEP = 2  # families kept per target after the one-prompt screen
GROUPS = ("cachedit", "cache-dit", "diffusers", "fewer steps")
PARTS = ("fewer-steps", "cachedit", "peers")  # what `run_frontier` runs; results of parts run apart merge


@dataclass
class Point:
    """One method at one setting, averaged over the prompts it ran on."""

    group: str  # one of GROUPS
    family: str  # the settings that differ in one knob only (threshold, interval, steps)
    name: str
    ideal: float
    psnr_db: float
    ssim: float
    lpips: float | None = None
    prompts: int = 0
    screen: bool = False  # measured on the screening prompt only
    settings: dict = field(default_factory=dict)

    def row(self) -> dict:
        return asdict(self)


def frontier_at(points: list[tuple[float, float]], target: float) -> float | None:
    """The value of the Pareto frontier of (speedup, value) points at `target`, linear between settings;
    None outside the frontier's range (no extrapolation)."""
    pts = sorted(points)
    best = [p for p in pts if not any(q[0] >= p[0] and q[1] > p[1] for q in pts if q is not p)]
    best.sort()
    for (x0, y0), (x1, y1) in zip(best, best[1:]):
        if x0 <= target <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (target - x0) / (x1 - x0)
    return next((y for x, y in best if abs(x - target) < 1e-9), None)


class BlockCounter:
    """Per block: its FLOPs per call (one counted plain call) and how often it really computed since
    `reset()` (a pre-hook on its attention module, which a block cachedit skips never reaches). Only for
    cachedit: a peer's hook that replaces a module's forward still passes the pre-hook."""

    def __init__(self, pipe, prompt: str, kwargs: dict) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        from ..adapters import adapter_for

        transformer = pipe.transformer
        self.blocks = [b for stack in adapter_for(transformer).stacks(transformer) for b in stack]
        self.calls = [0] * len(self.blocks)
        self.handles = [b.attn.register_forward_pre_hook(lambda *_, i=i: self._count(i))
                        for i, b in enumerate(self.blocks)]
        with FlopCounterMode(display=False) as counter:
            pipe(prompt=prompt, **kwargs)
        counts = counter.get_flop_counts()
        names = {m: n for n, m in transformer.named_modules()}
        self.flops = []
        for i, block in enumerate(self.blocks):
            mine = [sum(v.values()) for k, v in counts.items() if k == names[block] or k.endswith("." + names[block])]
            self.flops.append(max(mine) / self.calls[i])
        self.plain = sum(self.flops[i] * self.calls[i] for i in range(len(self.blocks)))  # one plain call
        self.reset()

    def _count(self, i: int) -> None:
        self.calls[i] += 1

    def reset(self) -> None:
        self.calls = [0] * len(self.blocks)

    def executed(self) -> float:
        return sum(f * c for f, c in zip(self.flops, self.calls))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class Scorer:
    """PSNR, SSIM and (with `lpips=True`) LPIPS of images against their references."""

    def __init__(self, lpips: bool = False) -> None:
        self.lpips = lpips_metric() if lpips else None

    def __call__(self, images: list[torch.Tensor], references: list[torch.Tensor]) -> dict:
        from ..metrics import psnr, ssim

        out = {"psnr_db": statistics.mean(min(psnr(a, b), 100.0) for a, b in zip(images, references)),
               "ssim": statistics.mean(ssim(a, b) for a, b in zip(images, references)), "lpips": None}
        if self.lpips is not None:
            out["lpips"] = statistics.mean(self.lpips(a, b) for a, b in zip(images, references))
        return out


def lpips_metric() -> Callable:
    """torchmetrics' LPIPS (AlexNet). It needs the backbone's pretrained ImageNet weights, which torchvision
    downloads unless they are in its cache: where they cannot be had, a RuntimeError saying so."""
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).eval()
    except Exception as exc:  # ImportError (torchvision), or the weights' download failing offline
        raise RuntimeError(f"--lpips: LPIPS cannot run here: the AlexNet backbone weights are not available "
                           f"({type(exc).__name__}: {str(exc)[:200]})") from None

    def score(image: torch.Tensor, reference: torch.Tensor) -> float:
        from ..metrics import _as_images

        with torch.no_grad():
            return float(metric(_as_images(image), _as_images(reference)))

    return score


def cachedit_families(policy_options: dict[str, dict], quick: bool = False, policies: list[str] | None = None,
                      calibrators: list | None = None) -> list:
    """`tune.Candidate`s from the live registries (optionally only some policies / calibrators);
    `quick`: per family its first, middle and last setting."""
    from ..tune import search_space

    candidates = search_space(policies, calibrators, policy_options)
    if not quick:
        return candidates
    by_family: dict[str, list] = {}
    for c in candidates:
        by_family.setdefault(c.family, []).append(c)
    picks = (lambda m: {id(c): c for c in (m[0], m[len(m) // 2], m[-1])}.values())
    return [c for members in by_family.values() for c in picks(members)]


def peer_families(steps: int, mag_ratios, diffusers_ok: bool, quick: bool = False) -> tuple[list, list[str]]:
    """[(family, Method)] for cache-dit DBCache +-TaylorSeer and diffusers' FirstBlockCache, TaylorSeerCache
    lite / full and MagCache, and the reasons for those left out on this model."""
    from .methods import cache_dit_method, diffusers_method

    out, missing = [], []
    thresholds = (0.1, 0.3) if quick else (0.1, 0.2, 0.3, 0.5, 0.8)  # up to where each peer reaches 4-5x
    for taylorseer, cap in ((False, 3), (True, 3), (False, -1), (True, -1)):  # -1: cache-dit's own default, no cap
        family = "cache-dit DBCache F1B0" + (" +TaylorSeer" if taylorseer else "") + (" uncapped" if cap < 0 else "")
        if quick and cap < 0:
            continue
        for t in thresholds + ((1.5, 3.0) if cap < 0 and not quick else ()):  # uncapped: on to its limit
            m = cache_dit_method(f"{family} t={t}", taylorseer=taylorseer, Fn_compute_blocks=1, Bn_compute_blocks=0,
                                 residual_diff_threshold=t, max_warmup_steps=4, max_continuous_cached_steps=cap)
            if m is None:
                missing.append(f"{family}: cache-dit is not installed (pip install cache-dit==1.5.3 einops)")
                break
            out.append((family, m))
    if not diffusers_ok:
        missing.append("diffusers FirstBlockCache / TaylorSeerCache / MagCache: this model's transformer has no "
                       "enable_cache (no CacheMixin in diffusers' class)")
        return out, missing
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    for t in thresholds:
        out.append(("diffusers FirstBlockCache", diffusers_method(
            f"diffusers FirstBlockCache t={t}", lambda t=t: FirstBlockCacheConfig(threshold=t), threshold=t)))
    for lite in (True, False):
        family = "diffusers TaylorSeerCache " + ("lite" if lite else "full")
        for n in ((2, 4) if quick else (2, 3, 4, 5, 6, 8) if lite else (2, 3, 4, 6)):
            out.append((family, diffusers_method(
                f"{family} interval={n}", lambda n=n, lite=lite: TaylorSeerCacheConfig(
                    cache_interval=n, disable_cache_before_step=3, taylor_factors_dtype=torch.float32,
                    use_lite_mode=lite), cache_interval=n, lite=lite)))
    if mag_ratios is None:
        missing.append("diffusers MagCache: its calibration run gave no ratios")
    else:
        for t in ((0.06, 0.24) if quick else (0.06, 0.12, 0.24, 0.5)):
            out.append(("diffusers MagCache", diffusers_method(f"diffusers MagCache t={t}", lambda t=t: MagCacheConfig(
                threshold=t, num_inference_steps=steps, mag_ratios=mag_ratios), threshold=t)))
    return out, missing


def fewer_steps(steps: int) -> list[int]:
    """Step counts for ideal speedups near 2x to 7x (at least one step, fewer than `steps`)."""
    return sorted({max(1, round(steps * f)) for f in FEWER_STEPS_FRACTIONS} - {steps}, reverse=True)


def run_frontier(load: Callable, call: Callable, prompts: list[str], steps: int, quick: bool = False,
                 lpips: bool = False, screen: bool | None = None, policies: list[str] | None = None,
                 calibrators: list | None = None, log: Callable = print,
                 progress: Callable | None = None, parts: tuple[str, ...] = PARTS,
                 peers: list[str] | None = None) -> dict:
    """Every method on `prompts` (seed i for prompt i) against the plain pipeline at `steps`; `screen`
    (default: with more than 2 prompts, not quick) screens cachedit's families on the first prompt;
    `progress(rows)` sees every point so far after each one (a long run's partial results); `parts`: some of
    PARTS (runs of different parts on the same prompts and seeds merge with `merge`); `peers`: only the peer
    families whose names contain one of these.
    Returns {"points": [Point rows], "left_out": [reasons], "targets": TARGETS}."""
    import cachedit

    from ..cache.calibrate import calibrate
    from .measure import block_names, counted
    from .methods import calibrate_mag_ratios, diffusers_can_cache

    score = Scorer(lpips)
    plain = load()
    blocks = block_names(plain.transformer)
    references, base_blocks = [], 0
    for i, p in enumerate(prompts):
        image, _, b = counted(plain, p, call(steps, i), blocks)
        references.append(image)
        base_blocks += b
    points: list[Point] = []

    def add(point: Point) -> None:
        points.append(point)
        if progress is not None:
            progress([p.row() for p in points])
        log(f"{point.name}: ideal {point.ideal:.2f}x PSNR {point.psnr_db:.2f} dB SSIM {point.ssim:.4f}"
            + (" (screen)" if point.screen else ""))

    for n in fewer_steps(steps) if "fewer-steps" in parts else ():  # the same plain pipeline, fewer steps
        images = [plain(prompt=p, **call(n, i))[0] for i, p in enumerate(prompts)]
        add(Point("fewer steps", "fewer steps", f"{n} steps", steps / n, prompts=len(prompts),
                  settings={"num_inference_steps": n}, **score(images, references)))

    runs = [dict(prompt=prompts[i % len(prompts)], **call(steps, 100 + i)) for i in range(1 if quick else 3)]
    options = {name: calibrate(plain, name, runs) for name in ("teacache", "magcache")  # unseen seeds
               if "cachedit" in parts and (policies is None or name in policies)}
    if "cachedit" in parts and (policies is None or "schedule" in policies):  # one searched schedule per budget
        from ..tune import schedule_options

        options["schedule"] = schedule_options(plain, runs)
    counter = BlockCounter(plain, prompts[0], call(steps, 0))

    def run_cachedit(candidate, some: list[int]) -> Point:
        cachedit.accelerate(plain, device="auto", cache=candidate.cache)
        try:
            counter.reset()
            images = [plain(prompt=prompts[i], **call(steps, i))[0] for i in some]
            ideal = counter.plain * len(some) / max(counter.executed(), 1.0)
        finally:
            cachedit.disable(plain)
        name = f"{candidate.family} " + _knob(candidate.cache)
        return Point("cachedit", candidate.family, name, ideal, prompts=len(some), screen=len(some) < len(prompts),
                     settings=candidate.cache, **score(images, [references[i] for i in some]))

    candidates = cachedit_families(options, quick, policies, calibrators) if "cachedit" in parts else []
    families = sorted({c.family for c in candidates})
    screen = len(prompts) > 2 and not quick if screen is None else screen
    if screen and candidates:  # each family's first, middle and last setting on the first prompt
        screened = cachedit_families(options, True, policies, calibrators)
        for c in screened:
            add(run_cachedit(c, [0]))
        keep = _best_families([p for p in points if p.group == "cachedit"])
        log(f"screened {len(screened)} cachedit configurations in {len(families)} families on one prompt; "
            f"kept {len(keep)}: {', '.join(sorted(keep))}")
        candidates = [c for c in candidates if c.family in keep]
    for c in candidates:
        add(run_cachedit(c, list(range(len(prompts)))))
    counter.close()

    found, left_out = [], []
    if "peers" in parts:
        wanted = (lambda family: peers is None or any(w in family for w in peers))
        mag_ratios = calibrate_mag_ratios(load, call, prompts[0], steps) if wanted("diffusers MagCache") else None
        found, left_out = peer_families(steps, mag_ratios, diffusers_can_cache(plain), quick)
        found = [(f, m) for f, m in found if wanted(f)]
        left_out = [r for r in left_out if wanted(r.split(":")[0])]
    for family, method in found:  # each on a pipeline of its own: peers patch state that outlives disable
        try:
            pipe = load()
            method.apply(pipe)
            images, executed = [], 0
            for i, p in enumerate(prompts):
                image, _, b = counted(pipe, p, call(steps, i), blocks)
                images.append(image)
                executed += b
            method.remove(pipe)
        except Exception as exc:  # a peer that cannot run on this model is reported, not fatal
            left_out.append(f"{method.name}: failed on this model ({type(exc).__name__}: {str(exc)[:160]})")
            log(left_out[-1])
            continue
        add(Point(method.family, family, method.name, base_blocks / max(executed, 1), prompts=len(prompts),
                  settings={k: v for k, v in method.settings.items()}, **score(images, references)))
    return {"points": [p.row() for p in points], "left_out": left_out, "targets": list(TARGETS),
            "cachedit_families": families}


def merge(results: list[dict]) -> dict:
    """One result from runs of different parts (or policies) on the same model, prompts and seeds; a method
    measured by two runs is kept once (the first)."""
    out = {"points": [], "left_out": [], "targets": list(TARGETS), "cachedit_families": []}
    seen = set()
    for r in results:
        for p in r["points"]:
            if (p["name"], p["screen"]) not in seen:
                seen.add((p["name"], p["screen"]))
                out["points"].append(p)
        out["left_out"] += r.get("left_out", [])
        out["cachedit_families"] = sorted(set(out["cachedit_families"]) | set(r.get("cachedit_families", [])))
    return out


def _knob(cache: dict) -> str:
    if "interval" in cache.get("policy_options", {}):
        return f"N={cache['policy_options']['interval']}"
    if "steps" in cache.get("policy_options", {}):  # a searched schedule: its computed calls, and which one
        steps = cache["policy_options"]["steps"]
        lists = list(steps.values()) if isinstance(steps, dict) else [steps]
        digest = hashlib.sha1(json.dumps(steps, sort_keys=True).encode()).hexdigest()[:6]
        return f"computed={'+'.join(str(len(s)) for s in lists)} ({digest})"
    if isinstance(cache.get("steps_mask"), str):
        return ""
    return f"t={cache.get('residual_diff_threshold')}"


def _best_families(points: list[Point], keep: int = SCREEN_KEEP) -> set[str]:
    """The families among the best `keep` at some target, each scored by its frontier there (or, past its
    range, not at all), plus each family that alone reaches a target's neighbourhood."""
    out = set()
    families = sorted({p.family for p in points})
    for target in TARGETS:
        scored = []
        for f in families:
            value = frontier_at([(p.ideal, p.psnr_db) for p in points if p.family == f], target)
            above = [p.psnr_db for p in points if p.family == f and p.ideal >= target]
            best = max(v for v in (value, max(above, default=None)) if v is not None) if (value or above) else None
            if best is not None:
                scored.append((best, f))
        out |= {f for _, f in sorted(scored, reverse=True)[:keep]}
    return out


def summary(points: list[dict], targets=TARGETS, key: str = "psnr_db") -> list[dict]:
    """Per target: the best family of each side at `key` (PSNR or SSIM) on the all-prompt points."""
    full = [p for p in points if not p["screen"]]
    rows = []
    for target in targets:
        row = {"target": target}
        for side, groups in (("cachedit", ("cachedit",)), ("peer", ("cache-dit", "diffusers")),
                             ("fewer steps", ("fewer steps",))):
            best = None
            for f in sorted({p["family"] for p in full if p["group"] in groups}):
                v = frontier_at([(p["ideal"], p[key]) for p in full if p["family"] == f], target)
                if v is not None and (best is None or v > best[0]):
                    best = (v, f)
            row[side] = None if best is None else {"family": best[1], key: best[0]}
        rows.append(row)
    return rows


def table(points: list[dict], targets=TARGETS) -> str:
    """Markdown: per target, the best cachedit family, the best peer, fewer steps, and cachedit's margins."""
    psnr_rows, ssim_rows = summary(points, targets), summary(points, targets, "ssim")
    lines = ["| ideal speedup | best cachedit (PSNR dB / SSIM) | best peer (PSNR dB / SSIM) | fewer steps "
             "(PSNR dB / SSIM) | cachedit - peer | cachedit - fewer steps |", "|---|---|---|---|---|---|"]

    def cell(row, srow, side):
        if row[side] is None:
            return "-"
        s = srow[side]["ssim"] if srow[side] else math.nan
        name = "" if side == "fewer steps" else f"{row[side]['family']}: "
        return f"{name}{row[side]['psnr_db']:.2f} / {s:.4f}"

    def margin(row, other):
        if row["cachedit"] is None or row[other] is None:
            return "-"
        return f"{row['cachedit']['psnr_db'] - row[other]['psnr_db']:+.2f} dB"

    for row, srow in zip(psnr_rows, ssim_rows):
        lines.append(f"| {row['target']:g}x | {cell(row, srow, 'cachedit')} | {cell(row, srow, 'peer')} | "
                     f"{cell(row, srow, 'fewer steps')} | {margin(row, 'peer')} | {margin(row, 'fewer steps')} |")
    return "\n".join(lines)


def family_table(points: list[dict], targets=TARGETS) -> str:
    """Markdown: every family's frontier PSNR at each target (all-prompt points only)."""
    full = [p for p in points if not p["screen"]]
    lines = ["| group | family | " + " | ".join(f"{t:g}x" for t in targets) + " |", "|---|---|" + "---|" * len(targets)]
    for group in GROUPS:
        for f in sorted({p["family"] for p in full if p["group"] == group}):
            cells = [frontier_at([(p["ideal"], p["psnr_db"]) for p in full if p["family"] == f], t) for t in targets]
            lines.append(f"| {group} | {f} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def _pareto(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return sorted(p for p in pts if not any(q[0] >= p[0] and q[1] > p[1] for q in pts if q is not p))


def plot(points: list[dict], path, title: str = "") -> bool:
    """PSNR against ideal speedup: cachedit's points and their envelope (the best of every family), each peer
    family's frontier, fewer steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    full = [p for p in points if not p["screen"]]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    mine = [(p["ideal"], p["psnr_db"]) for p in full if p["group"] == "cachedit"]
    ax.plot([x for x, _ in mine], [y for _, y in mine], ".", color="tab:blue", alpha=0.25, ms=4)
    env = _pareto(mine)
    ax.plot([x for x, _ in env], [y for _, y in env], "o-", color="tab:blue", lw=2, ms=4,
            label="cachedit: best of every registered policy x calibrator")
    peers = sorted({(p["group"], p["family"]) for p in full if p["group"] in ("cache-dit", "diffusers")})
    cmap = plt.get_cmap("tab10")
    for k, (group, family) in enumerate(peers):
        pts = _pareto([(p["ideal"], p["psnr_db"]) for p in full if p["family"] == family])
        ax.plot([x for x, _ in pts], [y for _, y in pts], "s--", ms=3, lw=1, color=cmap((k + 1) % 10), label=family)
    steps = sorted((p["ideal"], p["psnr_db"]) for p in full if p["group"] == "fewer steps")
    ax.plot([x for x, _ in steps], [y for _, y in steps], "k^:", ms=4, lw=1, label="fewer steps")
    for t in TARGETS:
        ax.axvline(t, color="grey", lw=0.4, ls=":")
    ax.set_xlim(1, max(TARGETS) + 1)
    ax.set_xlabel("ideal speedup (executed transformer-block FLOPs; fewer steps: full / steps)")
    ax.set_ylabel("PSNR vs uncached (dB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
