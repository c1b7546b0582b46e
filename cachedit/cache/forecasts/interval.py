"""The fixed-interval policy: compute every N-th step, forecast the rest.

No signal, no threshold search: after the warm-up steps (`CacheConfig.warmup_steps`), each
computed step is followed by N-1 skipped ones, and the calibrator forecasts the skipped blocks'
residual. With Fn=0 and Bn=0 the whole stack is skipped and one residual per stream forecast,
what diffusers' TaylorSeerCache does in lite mode: the strongest simple baseline at 2-4x.
Per-context states keep the CFG branches apart. The step limits still apply (a step mask, max
cached steps), and `residual_diff_threshold` must be > 0 for anything to skip, as for every policy.
"""

from __future__ import annotations

from ..policies import Policy, whole_number


class Interval(Policy):
    name = "interval"
    tune_intervals = (2, 3, 4, 5, 6)  # what `cachedit tune` tries (the threshold only has to be > 0)

    @classmethod
    def tune_space(cls) -> list[dict]:
        return [dict(Fn=0, Bn=0, residual_diff_threshold=1.0, warmup_steps=2, policy_options={"interval": n})
                for n in cls.tune_intervals]

    def __init__(self, interval: int = 3) -> None:
        self.interval = whole_number(self.name, "interval", interval, 1)

    def skip(self, cache, st, probe) -> bool:
        return st.continuous < self.interval - 1  # consecutive cached steps so far, this one excluded
