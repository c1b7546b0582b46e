"""The schedule policy: compute exactly the listed steps, forecast the rest.

Threshold-free and deterministic: the computed steps are data in the config, found once per model
by `cachedit.cache.schedule_search` (a best path over the steps under an error budget, LeMiCa-style)
or written by hand, so a tuned JSON file reproduces them. Each cache context (CFG branch: "cond",
"uncond", or "branch0" where the pipeline names none) may have its own steps:

    CacheConfig(Fn=0, Bn=0, warmup_steps=0, residual_diff_threshold=1.0, calibrator="foca",
                policy="schedule", policy_options={"steps": {"cond": [0, 1, 3, 6], "uncond": [0, 2, 6]},
                                                   "num_steps": 8})

A plain list applies to every context; a context a dict does not name computes every step. With
`num_steps` given, a call with another step count maps each listed step to the same fraction of
its schedule. Step 0 must be listed (there is nothing to reuse before it). The config's step
limits (step mask, max cached steps) still apply; warm-up steps would add computed steps the list
does not name, so `warmup_steps` must be 0.
"""

from __future__ import annotations

from ..policies import Policy, _option_error, whole_number

ALLOWED_STEPS = ("a non-empty list of distinct step indices >= 0 that includes 0, or a dict of cache context "
                 "name -> such a list")


def _steps(value, where: str, limit: int | None) -> frozenset[int]:
    ok = isinstance(value, (list, tuple)) and value and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)
    if not ok or len(set(value)) != len(value) or 0 not in value or (limit is not None and max(value) >= limit):
        allowed = ALLOWED_STEPS + (f" (each < num_steps={limit})" if limit is not None else "")
        raise _option_error("schedule", where, value, allowed)
    return frozenset(value)


class Schedule(Policy):
    name = "schedule"
    tune_calibrators = ("foca",)  # the calibrator the search simulates (the best one measured at long skips)

    @classmethod
    def tune_space(cls) -> list[dict]:
        """The fields around a calibrated schedule; `cachedit tune` adds the steps per budget."""
        return [dict(Fn=0, Bn=0, residual_diff_threshold=1.0, warmup_steps=0)]

    def __init__(self, steps=None, num_steps: int | None = None) -> None:
        if steps is None:
            raise ValueError("CacheConfig.policy_options['steps'] is required for policy 'schedule': "
                             f"{ALLOWED_STEPS}; search them once with cachedit.cache.schedule_search")
        self.num_steps = None if num_steps is None else whole_number(self.name, "num_steps", num_steps, 1)
        if isinstance(steps, dict):
            if not steps or not all(isinstance(k, str) and k for k in steps):
                raise _option_error(self.name, "steps", steps, ALLOWED_STEPS)
            self.steps = {k: _steps(v, f"steps[{k!r}]", self.num_steps) for k, v in steps.items()}
        else:
            self.steps = {None: _steps(steps, "steps", self.num_steps)}
        self._mapped: dict = {}  # (context, num_steps) -> computed steps at that step count

    def check_config(self, config) -> None:
        if config.warmup_steps:
            raise ValueError(f"CacheConfig.warmup_steps={config.warmup_steps} is invalid for policy 'schedule' "
                             "(warm-up would compute steps the schedule does not list); allowed values: 0")

    def computed_steps(self, context: str | None, num_steps: int | None) -> frozenset[int] | None:
        """The steps this context computes in a call of `num_steps` steps (None: every step)."""
        listed = self.steps.get(None) if None in self.steps else self.steps.get(context)
        if listed is None:
            return None
        if self.num_steps is None or not num_steps or num_steps == self.num_steps:
            return listed
        key = (context, num_steps)
        if key not in self._mapped:
            scale = (num_steps - 1) / max(1, self.num_steps - 1)
            self._mapped[key] = frozenset(round(s * scale) for s in listed)
        return self._mapped[key]

    def skip(self, cache, st, probe) -> bool:
        context = cache.states.context_info
        steps = self.computed_steps(context.name if context is not None else None, st.num_steps)
        return steps is not None and st.step not in steps
