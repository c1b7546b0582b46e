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

    def __init__(self, interval: int = 3) -> None:
        self.interval = whole_number(self.name, "interval", interval, 1)

    def skip(self, cache, st, probe) -> bool:
        return st.continuous < self.interval - 1  # consecutive cached steps so far, this one excluded
