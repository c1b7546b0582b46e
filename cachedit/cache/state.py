"""Per-call cache state, one per diffusers cache context ("cond", "uncond", ...) and block stack.

Pipelines name their transformer calls with `transformer.cache_context(name)`; a
`ContextStates` (a diffusers `StateManager`) keeps one `CallState` per name, so the conditional
and unconditional branches of classifier-free guidance never share residuals. Calls no context
names get a branch name from `runs.py` (or "default"). States live for one pipeline call, request or
denoising run (see `dbcache.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .._diffusers_compat import BaseState, StateManager, clear_states, context_states, current_context, new_state
from .calibrators import Calibrator, make_calibrator

if TYPE_CHECKING:
    from ..config import CacheConfig

DEFAULT_CONTEXT = "default"
MAX_STATES = 8  # live states per block stack (a pipeline names two or three contexts)


@dataclass
class CallState(BaseState):
    """Everything one context remembers during one pipeline call."""

    config: CacheConfig | None = None  # what the calibrators are built from (None: plain reuse)
    threshold: float = 0.0  # this context's skip threshold (CacheConfig.threshold_for)
    step: int = -1
    num_steps: int | None = None
    mask: tuple[int, ...] | None = None
    cached_steps: list[int] = field(default_factory=list)
    diffs: dict[int, float] = field(default_factory=dict)
    accumulated_diff: float = 0.0
    continuous: int = 0
    blocks_computed: int = 0
    blocks_total: int = 0
    pruned: dict[int, list[int]] = field(default_factory=dict)  # DBPrune: step -> skipped block ids
    # tensors
    memo: dict = field(default_factory=dict)  # the policy's memory (see policies.py)
    block0: tuple | None = None  # this step's first block call (module, args, kwargs), for modulated inputs
    hidden_in: torch.Tensor | None = None  # this step's stack input
    middle_in: tuple | None = None  # this step's (hidden, encoder) into the first middle block
    skipping: bool = False
    probe: object = None  # this step's policy probe
    hidden_residual: Calibrator | None = None
    encoder_residual: Calibrator | None = None
    block_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # DBPrune
    block_residuals: dict[int, tuple] = field(default_factory=dict)  # DBPrune
    positions: dict = field(default_factory=dict)  # step -> the transformer's timestep at that step (tensor view)

    def __post_init__(self) -> None:
        self.hidden_residual = make_calibrator(self.config)
        self.encoder_residual = make_calibrator(self.config)
        for calibrator in (self.hidden_residual, self.encoder_residual):
            if getattr(calibrator, "clock", "step") == "timestep":  # distances between steps from the timesteps
                calibrator.position_of = self.positions.get

    def reset(self) -> None:
        self.__init__(self.config, self.threshold)

    def report(self) -> dict:
        return {"steps": self.step + 1, "cached_steps": list(self.cached_steps),
                "residual_diffs": {k: round(v, 6) for k, v in self.diffs.items()},
                "pruned_blocks": {k: list(v) for k, v in self.pruned.items()},
                "blocks_computed": self.blocks_computed, "blocks_total": self.blocks_total}


class ContextStates(StateManager):
    """A StateManager that falls back to the "default" context instead of raising, and holds at most
    `MAX_STATES` states: a new context beyond that evicts the oldest one, so no naming can pile up states.
    `per_context(name)` gives the keyword arguments that differ by context (its threshold)."""

    def __init__(self, state_cls, init_args=None, init_kwargs=None, per_context=None) -> None:
        super().__init__(state_cls, init_args, init_kwargs)
        self.per_context = per_context or (lambda name: {})

    def get_state(self) -> CallState:
        context = current_context(self)
        name = context.name if context is not None else DEFAULT_CONTEXT
        states = context_states(self)
        if name not in states:
            while len(states) >= MAX_STATES:
                del states[next(iter(states))]
            states[name] = new_state(self, **self.per_context(name))
        return states[name]

    @property
    def context_info(self):
        return current_context(self)

    def live(self) -> int:
        """How many contexts hold a state now (0 between runs)."""
        return len(context_states(self))

    def drop(self, name: str) -> None:
        """Forget context `name`'s state, if it has one."""
        context_states(self).pop(name, None)

    def reports(self) -> dict[str, dict]:
        return {name: state.report() for name, state in context_states(self).items()}

    def reset(self, *args, **kwargs) -> None:
        clear_states(self)
