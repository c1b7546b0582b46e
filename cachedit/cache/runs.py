"""Which branch a transformer call is and where a denoising run starts, from timesteps alone.

Two questions the cache must answer without any memory address:
- Pipelines that name no `cache_context` (Chroma, Lumina2) make one call per CFG branch at each step,
  at the same timestep. Calls are numbered by their order at one timestep: the first is branch 0, the
  second branch 1. A pipeline that drops its unconditional call on some steps keeps branch 0 for the
  conditional one.
- A transformer called directly (serving) has no pipeline call around it. A call of a branch already
  seen in this run, at a timestep the run does not progress to (the same one, or one behind it: the
  schedule restarted), starts a new run. Diffusers timesteps fall (some pipelines pass `1 - t`, which
  rises), so a run's direction is learned from its first two steps.

The heuristic cannot see a request that begins exactly where the previous one left off, or a new
one-step request at the same timestep; `cachedit.request(pipe)` marks requests explicitly.
"""

from __future__ import annotations

MAX_BRANCHES = 4  # more calls than this at one timestep: a new run (e.g. repeated one-step requests)


class RunTracker:
    """Follows the timesteps of one transformer's calls (`observe`); `clear` forgets the run."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.last: dict[str, float] = {}  # branch -> its latest timestep in this run
        self.direction = 0  # +1 / -1 once the run has progressed, 0 before
        self.timestep: float | None = None  # the previous call's timestep
        self.order = 0  # the previous call's position among the calls at its timestep

    def observe(self, timestep: float, name: str | None) -> tuple[str | None, bool]:
        """(the branch name for an unnamed call, or None for a named one; whether a new run starts here)."""
        order = self.order + 1 if timestep == self.timestep else 0
        restart = order >= MAX_BRANCHES
        if restart:
            order = 0
        branch = f"branch{order}" if name is None else name
        previous = self.last.get(branch)
        if previous is not None and not restart:
            step = timestep - previous
            if step == 0 or self.direction * step < 0:
                restart = True
            elif not self.direction:
                self.direction = 1 if step > 0 else -1
        if restart:
            self.last.clear()
            self.direction = 0
        self.last[branch] = timestep
        self.timestep, self.order = timestep, order
        return (branch if name is None else None), restart
