"""Search the computed steps of a schedule under an error budget over the whole run (LeMiCa-style).

Greedy thresholds decide each step from what they saw so far; here the computed steps are placed
once per model, for a target number of computed steps (the ideal speedup of an Fn=0, Bn=0 cache),
minimising the estimated error of the forecasts the schedule implies:

- `calibrate.record_streams` records every step's full-stack residuals per cache context, from uncached
  runs on a few calibration prompts;
- an edge (i -> j) of a graph over the steps is "compute i, forecast i+1 .. j-1, compute j"; its cost
  is measured offline, by running the config's calibrator (FoCa, Taylor ...) on the recorded residuals
  over the real steps and timesteps, so no extra pipeline runs. Calibrators look two computed steps back,
  so the cost is of the pair (h, i) of the last two computed steps and the next one j: exact for
  FoCa and first-order Taylor, whose state is those two anchors (FoCa's predictor also uses its last
  forecast point, which is approximated by the anchor h);
- the error of a forecast step k is the relative L1 error of the forecast residual, averaged over the
  streams and calibration runs, times the step's share of the sigma schedule (the Euler update scales
  the velocity error by it);
- a dynamic program finds the best path with k computed steps, starting at step 0, for every k at once,
  minimising the sum of the edge costs ("sum") or the largest step error ("max");
- cache contexts (CFG branches) get their own paths; a total budget is split between them where the
  weighted sum of their best costs is least ("search"), or evenly ("even"). Weights say how much each
  branch's error reaches the guided output: with true CFG g, cond g and uncond g - 1. Or all contexts
  share one path ("shared"), the best for the weighted sum of their errors: forecasts of both branches
  at the same steps err alike, and the guidance difference cond - uncond cancels part of it.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch

from .calibrators import CALIBRATORS, make_calibrator

OBJECTIVES = ("sum", "max")
SPLITS = ("search", "even", "shared")


def _relative_l1(predicted: torch.Tensor, actual: torch.Tensor) -> float:
    return float((predicted - actual).abs().mean() / actual.abs().mean().clamp_min(1e-12))


def step_weights(timesteps: list[float]) -> np.ndarray:
    """Each step's share of the schedule: (t_k - t_k+1) / t_0, the last step to 0 (uniform without timesteps)."""
    t = np.asarray(timesteps, dtype=float)
    if len(t) < 2 or not np.all(np.isfinite(t)) or t[0] == 0:
        return np.full(len(t), 1.0 / max(1, len(t)))
    return np.abs(t - np.append(t[1:], 0.0)) / abs(t[0])


def edge_costs(residuals: list[list[torch.Tensor]], timesteps: list[float], calibrator: str | None = "foca",
               order: int = 1) -> np.ndarray:
    """errors[h + 1, i, k]: the weighted forecast error at step k > i, the last two computed steps being h < i
    (h = -1: i is the first computed step, 0). Invalid entries are 0; `path_costs` never reads them."""
    n = len(residuals)
    weights = step_weights(timesteps)
    positions = dict(enumerate(timesteps))
    errors = np.zeros((n + 1, n, n))
    for h in range(-1, n - 1):
        for i in ([0] if h < 0 else range(h + 1, n)):
            streams = []
            for s in range(len(residuals[i])):
                cal = make_calibrator(SimpleNamespace(calibrator=calibrator, taylorseer_order=order))
                if getattr(cal, "clock", "step") == "timestep":
                    cal.position_of = positions.get
                if h >= 0:
                    cal.update(h, residuals[h][s])
                cal.update(i, residuals[i][s])
                streams.append(cal)
            for k in range(i + 1, n):
                e = [_relative_l1(cal.predict(k), residuals[k][s]) for s, cal in enumerate(streams)]
                errors[h + 1, i, k] = weights[k] * float(np.mean(e))
    return errors


def path_costs(errors: np.ndarray, objective: str = "sum") -> np.ndarray:
    """cost[h + 1, i, j]: the cost of edge i -> j (forecast i+1 .. j-1) after h; j = n is the run's end."""
    n = errors.shape[1]
    cost = np.full((n + 1, n, n + 1), np.inf)
    acc = np.cumsum if objective == "sum" else np.maximum.accumulate
    for a in range(n + 1):
        for i in range(n):
            if not ((a == 0 and i == 0) or 0 < a <= i):
                continue  # not a state: the first computed step is 0, and h < i
            tail = errors[a, i, i + 1:]  # steps i+1 .. n-1
            cost[a, i, i + 1] = 0.0
            if len(tail):
                cost[a, i, i + 2:] = acc(tail)
    return cost


def best_paths(cost: np.ndarray, objective: str = "sum") -> list[tuple[float, list[int]]]:
    """For k = 1 .. n computed steps: (its least cost, the computed steps), by dynamic programming over the
    states (last two computed steps)."""
    n = cost.shape[1]
    combine = np.add if objective == "sum" else np.maximum
    best = np.full((n + 1, n), np.inf)  # best[h + 1, i]: least cost so far, the last two computed being h, i
    best[0, 0] = 0.0
    backs, out = [], []
    for k in range(1, n + 1):
        final = combine(best, cost[:, :, n])
        a, i = np.unravel_index(np.argmin(final), final.shape)
        value = float(final[a, i])
        steps = [int(i)]
        for back in reversed(backs):
            if a == 0:
                break
            h = a - 1
            a, i = back[h, i], h
            steps.append(int(i))
        out.append((value, sorted(steps)))
        if k == n:
            break
        total = combine(best[:, :, None], cost[:, :, :n])  # [a, i, j]
        back = np.argmin(total, axis=0)  # [i, j]: the best a before the edge i -> j
        new = np.full((n + 1, n), np.inf)
        new[1:, :] = np.min(total, axis=0)
        best = new
        backs.append(back)
    return out


class ScheduleSearch:
    """Best schedules per cache context from `calibrate.record_streams` output, for any budget."""

    def __init__(self, recorded: list[dict[str, dict]], calibrator: str | None = "foca", order: int = 1,
                 objective: str = "sum") -> None:
        if calibrator is not None and calibrator not in CALIBRATORS:
            raise ValueError(f"schedule search: calibrator={calibrator!r} is unknown; allowed values: "
                             f"{sorted(CALIBRATORS.names())} or None")
        if objective not in OBJECTIVES:
            raise ValueError(f"schedule search: objective={objective!r} is invalid; allowed values: {OBJECTIVES}")
        if not recorded or not all(recorded):
            raise ValueError("schedule search: recorded needs at least one run with at least one cache context")
        contexts = [c for c in recorded[0] if all(c in run for run in recorded)]
        self.num_steps = min(len(run[c]["residuals"]) for run in recorded for c in contexts)
        if not contexts or self.num_steps < 2:
            raise ValueError("schedule search: the runs share no cache context of at least 2 steps")
        self.calibrator, self.objective = calibrator, objective
        self.errors, self.paths, self._shared = {}, {}, {}
        n = self.num_steps
        for c in contexts:
            per_run = [edge_costs(run[c]["residuals"][:n], run[c]["timesteps"][:n], calibrator, order)
                       for run in recorded]
            self.errors[c] = np.mean(per_run, axis=0)
            self.paths[c] = best_paths(path_costs(self.errors[c], objective), objective)

    @property
    def contexts(self) -> list[str]:
        return list(self.paths)

    def best(self, context: str, k: int) -> tuple[float, list[int]]:
        """(cost, steps) of the best schedule of `k` computed steps for `context`."""
        return self.paths[context][max(1, min(k, self.num_steps)) - 1]

    def split(self, total: int, split: str = "search", weights: dict[str, float] | None = None) -> dict[str, int]:
        """Computed steps per context, `total` in all."""
        contexts, n = self.contexts, self.num_steps
        total = max(len(contexts), min(total, n * len(contexts)))
        if split == "even":
            base, extra = divmod(total, len(contexts))
            return {c: base + (i < extra) for i, c in enumerate(contexts)}
        w = {c: float((weights or {}).get(c, 1.0)) for c in contexts}
        table = {0: (0.0, {})}  # knapsack over contexts: steps used -> (weighted cost, allocation)
        for c in contexts:
            nxt = {}
            for used, (value, alloc) in table.items():
                for k in range(1, n + 1):
                    if used + k > total:
                        break
                    v = value + w[c] * self.best(c, k)[0]
                    if used + k not in nxt or v < nxt[used + k][0]:
                        nxt[used + k] = (v, {**alloc, c: k})
            table = nxt
        return table[total][1]

    def shared(self, k: int, weights: dict[str, float] | None = None) -> tuple[float, list[int]]:
        """(cost, steps) of the best schedule of `k` computed steps that every context shares."""
        w = {c: float((weights or {}).get(c, 1.0)) for c in self.contexts}
        key = tuple(sorted(w.items()))
        if key not in self._shared:
            errors = sum(w[c] * self.errors[c] for c in self.contexts)
            self._shared[key] = best_paths(path_costs(errors, self.objective), self.objective)
        return self._shared[key][max(1, min(k, self.num_steps)) - 1]

    def options(self, speedup: float, split: str = "search", weights: dict[str, float] | None = None) -> dict:
        """`policy_options` of the schedule policy for an ideal speedup of at least `speedup` (computed steps
        over all contexts: floor(contexts * steps / speedup); "shared": that many per context, one list)."""
        if not (isinstance(speedup, (int, float)) and math.isfinite(speedup) and speedup >= 1):
            raise ValueError(f"schedule search: speedup={speedup!r} is invalid; allowed values: a finite number >= 1")
        if split not in SPLITS:
            raise ValueError(f"schedule search: split={split!r} is invalid; allowed values: {SPLITS}")
        if weights is not None and (not isinstance(weights, dict) or not all(
                isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in weights.values())):
            raise ValueError(f"schedule search: weights={weights!r} is invalid; allowed values: a dict of cache "
                             "context -> finite number >= 0")
        total = math.floor(len(self.contexts) * self.num_steps / speedup + 1e-9)
        if split == "shared":
            return {"steps": self.shared(max(1, total // len(self.contexts)), weights)[1], "num_steps": self.num_steps}
        alloc = self.split(total, split, weights)
        return {"steps": {c: self.best(c, k)[1] for c, k in alloc.items()}, "num_steps": self.num_steps}
