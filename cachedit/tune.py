"""`cachedit tune`: the best cache configuration for a target speedup (or quality) on one model.

    cachedit tune --model reference --speedup 3 --out tuned.json
    pipe = cachedit.accelerate(pipe, cache="tuned.json")      # or: cachedit generate --cache tuned.json

Every registered policy declares its own search space (`Policy.tune_space`), crossed with every
registered calibrator, so a plugin's policy or calibrator is searched like the built-in ones. Each
candidate runs on a few calibration prompts and seeds; its ideal speedup counts the transformer-block
FLOPs it executed (`torch.utils.flop_counter`), its quality is the PSNR of its images against the
uncached ones. With several calibration runs, every candidate is first screened on the first run and
only the best families (`SCREEN_KEEP`) run on all of them. Around the target, each of the best
families is then bisected on its threshold, so the grid's spacing does not decide. The winner is written as a cache config file (its fields alone);
the trials go to a report JSON and the frontier to a PNG.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .config import CacheConfig

BISECTIONS = 2  # threshold refinements per family around the target
SCREEN_KEEP = 8  # families kept after screening every candidate on the first calibration run


@dataclass(frozen=True)
class Candidate:
    """One cache configuration to try: `family` groups the candidates that differ in threshold only."""

    family: str
    cache: dict = field(hash=False, compare=False)

    @property
    def threshold(self) -> float:
        return float(self.cache.get("residual_diff_threshold", 0.0))


@dataclass
class Trial:
    candidate: Candidate
    ideal_speedup: float
    psnr_db: float

    def row(self) -> dict:
        return {"family": self.candidate.family, "cache": self.candidate.cache, "ideal_speedup": self.ideal_speedup,
                "psnr_db": self.psnr_db}


def search_space(policies: list[str] | None = None, calibrators: list[str | None] | None = None,
                 policy_options: dict[str, dict] | None = None) -> list[Candidate]:
    """Every registered policy's `tune_space`, crossed with the registered calibrators (those the policy names in
    `tune_calibrators`, where it does). `policy_options`: per policy, calibrated options (MagCache's ratios,
    TeaCache's polynomial), or a list of them, one candidate each (the schedule policy's steps per budget)."""
    from .cache.calibrators import CALIBRATORS
    from .cache.policies import POLICIES

    names = POLICIES.names() if policies is None else policies
    unknown = sorted(set(names) - set(POLICIES.names()))
    if unknown:
        raise ValueError(f"tune: policies {unknown} are unknown; allowed values: {sorted(POLICIES.names())}")
    known_calibs = [None, *CALIBRATORS.names()]  # None: plain reuse of the last computed residual
    calibs = known_calibs if calibrators is None else calibrators
    unknown = sorted(set(calibs) - set(known_calibs), key=str)
    if unknown:
        raise ValueError(f"tune: calibrators {unknown} are unknown; allowed values: {sorted(CALIBRATORS.names())}")
    options = policy_options or {}
    out = []
    for name in names:
        policy = POLICIES.get(name)
        given = options.get(name, {})
        for space in policy.tune_space():
            for calibrator in calibs:
                if policy.tune_calibrators is not None and calibrator not in policy.tune_calibrators:
                    continue
                for extra in (given if isinstance(given, list) else [given]):
                    cache = {**space, "policy": name, "calibrator": calibrator}
                    if extra:
                        cache["policy_options"] = {**cache.get("policy_options", {}), **extra}
                    try:
                        CacheConfig(**cache)
                    except ValueError:
                        continue  # this policy cannot run without options it was not given (e.g. MagCache's ratios)
                    mask = cache.get("steps_mask")
                    family = f"{name}" + (f" mask={mask}" if isinstance(mask, str) else "") + \
                        (f" Fn={cache.get('Fn', 1)}") + (f" +{calibrator}" if calibrator else "")
                    out.append(Candidate(family, cache))
    return out


class Evaluator:
    """Runs candidates on one pipeline (accelerated, then disabled again) against its uncached images."""

    def __init__(self, pipe, runs: list[dict], device: str = "auto", progress: Callable | None = None) -> None:
        from .benchmarking.measure import block_names, counted

        self.pipe, self.runs, self.device, self.progress = pipe, runs, device, progress
        self._counted, self._blocks = counted, block_names(pipe.transformer)
        self.references, self.base_blocks = [], 0
        for run in runs:
            image, _, blocks = self._call(run)
            self.references.append(image)
            self.base_blocks += blocks
        self.trials: list[Trial] = []

    def _call(self, run: dict):
        kwargs = dict(run)
        prompt = kwargs.pop("prompt")
        seed = kwargs.get("generator")  # every call starts from the same noise: a seed, or the generator's seed
        if isinstance(seed, torch.Generator):
            seed = seed.initial_seed()
        if isinstance(seed, int):
            kwargs["generator"] = torch.Generator().manual_seed(seed)
        return self._counted(self.pipe, prompt, kwargs, self._blocks)

    def __call__(self, candidate: Candidate) -> Trial:
        import cachedit
        from .metrics import psnr

        cachedit.accelerate(self.pipe, device=self.device, cache=candidate.cache)
        try:
            blocks, quality = 0, []
            for run, reference in zip(self.runs, self.references):
                image, _, executed = self._call(run)
                blocks += executed
                quality.append(min(psnr(image, reference), 100.0))
        finally:
            cachedit.disable(self.pipe)
        trial = Trial(candidate, self.base_blocks / max(blocks, 1), statistics.mean(quality))
        self.trials.append(trial)
        if self.progress is not None:
            self.progress(trial)
        return trial


def value_at(trials: list[Trial], speedup: float) -> float:
    """A family's PSNR at `speedup`, linear between its trials (-inf outside their range)."""
    pts = sorted((t.ideal_speedup, t.psnr_db) for t in trials)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= speedup <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (speedup - x0) / (x1 - x0)
    return pts[0][1] if pts and math.isclose(pts[0][0], speedup) else -math.inf


def choose(trials: list[Trial], speedup: float | None = None, psnr: float | None = None) -> Trial | None:
    """The best trial: highest PSNR at ideal speedup >= `speedup`, or highest speedup at PSNR >= `psnr`."""
    if speedup is not None:
        feasible = [t for t in trials if t.ideal_speedup >= speedup]
        return max(feasible, key=lambda t: (t.psnr_db, t.ideal_speedup), default=None)
    feasible = [t for t in trials if t.psnr_db >= psnr]
    return max(feasible, key=lambda t: (t.ideal_speedup, t.psnr_db), default=None)


def _bisect(evaluate: Evaluator, family: list[Trial], speedup: float | None, psnr: float | None) -> None:
    """Refine one family's threshold between the two trials that bracket the target."""
    for _ in range(BISECTIONS):
        pts = sorted(family, key=lambda t: t.candidate.threshold)
        inside = (lambda t: t.ideal_speedup >= speedup) if speedup is not None else (lambda t: t.psnr_db >= psnr)
        pairs = [(a, b) for a, b in zip(pts, pts[1:]) if inside(a) != inside(b)]
        if not pairs:
            return
        a, b = pairs[0]
        middle = (a.candidate.threshold + b.candidate.threshold) / 2
        if middle in (a.candidate.threshold, b.candidate.threshold):
            return
        cache = {**a.candidate.cache, "residual_diff_threshold": middle}
        family.append(evaluate(Candidate(a.candidate.family, cache)))


def _families(trials: list[Trial]) -> dict[str, list[Trial]]:
    out: dict[str, list[Trial]] = {}
    for trial in trials:
        out.setdefault(trial.candidate.family, []).append(trial)
    return out


def _ranked(families: dict[str, list[Trial]], speedup: float | None, psnr: float | None) -> list[str]:
    """Family names, best first at the target: PSNR at the speedup (interpolated, or its best point at or above
    it), or the highest speedup reaching the PSNR."""
    def score(name: str) -> float:
        trials = families[name]
        if speedup is not None:
            best = choose(trials, speedup=speedup)
            return max(value_at(trials, speedup), best.psnr_db if best else -math.inf)
        best = choose(trials, psnr=psnr)
        return best.ideal_speedup if best else -math.inf
    return sorted(families, key=score, reverse=True)


def tune(pipe, runs: list[dict], speedup: float | None = None, psnr: float | None = None,
         candidates: list[Candidate] | None = None, device: str = "auto", refine: int = 4,
         progress: Callable | None = None) -> tuple[Trial | None, list[Trial]]:
    """Search `candidates` (default: `search_space()`) on `runs` (pipeline-call kwargs with a prompt; an int
    `generator` is a seed) for the target; returns (best trial or None, every trial)."""
    if (speedup is None) == (psnr is None):
        raise ValueError("tune: give exactly one target, speedup= (ideal, > 1) or psnr= (dB)")
    if speedup is not None and not (isinstance(speedup, (int, float)) and math.isfinite(speedup) and speedup > 1):
        raise ValueError(f"tune: speedup={speedup!r} is invalid; allowed values: a finite number > 1")
    if psnr is not None and not (isinstance(psnr, (int, float)) and math.isfinite(psnr) and psnr > 0):
        raise ValueError(f"tune: psnr={psnr!r} is invalid; allowed values: a finite number of dB > 0")
    if not runs or not all(isinstance(r, dict) and "prompt" in r for r in runs):
        raise ValueError("tune: runs must be a non-empty list of pipeline-call dicts, each with a 'prompt'")
    candidates = search_space() if candidates is None else candidates
    if len(runs) > 1 and len({c.family for c in candidates}) > SCREEN_KEEP:  # screen on the first run alone
        first = Evaluator(pipe, runs[:1], device, progress)
        for candidate in candidates:
            first(candidate)
        keep = set(_ranked(_families(first.trials), speedup, psnr)[:SCREEN_KEEP])
        candidates = [c for c in candidates if c.family in keep]  # (the one-run trials are not returned)
    evaluate = Evaluator(pipe, runs, device, progress)
    for candidate in candidates:
        evaluate(candidate)
    families = _families(evaluate.trials)
    threshold_families = [k for k in _ranked(families, speedup, psnr)
                          if len({t.candidate.threshold for t in families[k]}) > 1]
    for name in threshold_families[:refine]:
        _bisect(evaluate, families[name], speedup, psnr)
    return choose(evaluate.trials, speedup, psnr), evaluate.trials


def plot(trials: list[Trial], best: Trial | None, path: Path) -> bool:
    """PSNR against ideal speedup, one series per family, the chosen configuration marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    families = sorted({t.candidate.family for t in trials})
    for name in families:
        pts = sorted((t.ideal_speedup, t.psnr_db) for t in trials if t.candidate.family == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, lw=0.8, label=name)
    if best is not None:
        ax.plot([best.ideal_speedup], [best.psnr_db], "k*", ms=14, label="chosen")
    ax.set_xlabel("ideal speedup (transformer-block FLOPs)")
    ax.set_ylabel("PSNR vs uncached (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


SCHEDULE_SPEEDUPS = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0)  # the budgets searched besides the target


def schedule_options(pipe, runs: list[dict], speedup: float | None = None) -> list[dict]:
    """The schedule policy's options for each budget (and the target's), searched once on the calibration runs
    with the calibrator it is tuned with."""
    from .cache.calibrate import record_streams
    from .cache.forecasts import Schedule
    from .cache.schedule_search import OBJECTIVES, ScheduleSearch

    recorded = record_streams(pipe, runs)
    speedups = sorted(set(SCHEDULE_SPEEDUPS) | ({speedup} if speedup else set()))
    out = []
    for calibrator in Schedule.tune_calibrators:
        for objective in OBJECTIVES:  # neither wins everywhere (README, "Searched schedules")
            search = ScheduleSearch(recorded, calibrator, objective=objective)
            out += [o for o in (search.options(s) for s in speedups) if o not in out]
    return out


def add_arguments(p) -> None:
    from .arguments import finite_float, model_source, positive_int, writable_file
    from .cache.calibrators import CALIBRATORS
    from .cache.policies import POLICIES

    p.add_argument("--model", default="reference", type=model_source("reference", "reference-sd3", "tiny"),
                   help="'reference' / 'reference-sd3' (built in), 'tiny' or a pipeline folder")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--speedup", type=finite_float, help="target ideal speedup: the best PSNR at or above it")
    target.add_argument("--psnr", type=finite_float, help="target PSNR (dB): the fastest configuration at or above it")
    p.add_argument("--prompts", nargs="+", default=None, help="calibration prompts (default: three of the model's)")
    p.add_argument("--seeds", type=positive_int, default=1, help="seeds per prompt")
    p.add_argument("--steps", type=positive_int, default=28)
    p.add_argument("--policies", nargs="+", choices=sorted(POLICIES.names()), default=None,
                   help="default: every registered")
    p.add_argument("--calibrators", nargs="+", choices=["none", *sorted(CALIBRATORS.names())], default=None,
                   help="default: every registered, and none")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="tuned.json", type=writable_file, help="the chosen cache config (JSON)")
    p.add_argument("--plot", default=None, type=writable_file, help="the frontier as PNG (default: next to --out)")


def run(args) -> int:
    from tqdm.auto import tqdm

    from .arguments import UserError
    from .benchmarking import model_and_call
    from .cache.calibrate import calibrate, calibrated_policies

    if args.speedup is not None and args.speedup <= 1:
        raise UserError(f"--speedup {args.speedup} is invalid; allowed values: a number > 1")
    if args.psnr is not None and args.psnr <= 0:
        raise UserError(f"--psnr {args.psnr} is invalid; allowed values: a number of dB > 0")
    if args.model in ("reference", "reference-sd3", "tiny"):
        torch.set_num_threads(1)  # the built-in small models: intra-op threads only add overhead
    load, call, default_prompts = model_and_call(args.model)
    prompts = args.prompts or default_prompts[-3:]  # the bench's first prompts stay unseen
    runs = [dict(prompt=p, **call(args.steps, 1000 + s)) for p in prompts for s in range(args.seeds)]
    pipe = load()
    options = {}
    wanted = args.policies if args.policies is not None else None
    for name in calibrated_policies():
        if wanted is None or name in wanted:
            options[name] = calibrate(pipe, name, runs)
    if wanted is None or "schedule" in wanted:
        options["schedule"] = schedule_options(pipe, runs, args.speedup)
    calibs = None if args.calibrators is None else [None if c == "none" else c for c in args.calibrators]
    candidates = search_space(wanted, calibs, options)
    bar = tqdm(total=len(candidates), desc="tune", unit="config", dynamic_ncols=True)

    def progress(trial: Trial) -> None:
        if bar.n >= bar.total:
            bar.total += 1
        bar.update(1)
        bar.set_postfix_str(f"{trial.ideal_speedup:.2f}x {trial.psnr_db:.1f} dB")

    try:
        best, trials = tune(pipe, runs, args.speedup, args.psnr, candidates, args.device, progress=progress)
    finally:
        bar.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = out.with_suffix(".report.json")
    report.write_text(json.dumps({"model": args.model, "steps": args.steps, "prompts": prompts, "seeds": args.seeds,
                                  "target": {"speedup": args.speedup, "psnr": args.psnr},
                                  "best": best.row() if best else None,
                                  "trials": [t.row() for t in trials]}, indent=2))
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    drawn = plot(trials, best, png)
    if best is None:
        fastest = max(trials, key=lambda t: t.ideal_speedup)
        raise UserError(f"no configuration reaches the target ({len(trials)} tried; fastest {fastest.ideal_speedup:.2f}x "
                        f"at {fastest.psnr_db:.1f} dB); see {report}")
    out.write_text(json.dumps(best.candidate.cache, indent=2) + "\n")
    print(f"best: {best.candidate.family} threshold {best.candidate.threshold:g}: ideal {best.ideal_speedup:.2f}x, "
          f"{best.psnr_db:.2f} dB PSNR over {len(runs)} calibration runs ({len(trials)} configurations tried)")
    print(f"wrote {out} (use: cachedit.accelerate(pipe, cache={str(out)!r})), {report}" + (f", {png}" if drawn else ""))
    return 0
