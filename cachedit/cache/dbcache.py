"""DBCache and DBPrune as diffusers hooks on each transformer block of a stack.

Per step, the first Fn blocks run; at the entry of the first middle block the config's policy
(`policies.py`: DBCache's first-blocks residual change by default) decides whether the middle
blocks run or are skipped, in which case their residual from the last computed step (or a
calibrator's forecast of it) is added instead. The last Bn blocks always run. DBPrune (per block): each middle block not protected is skipped on
its own when its input changed by less than the threshold, reusing its own last residual.

State lives per diffusers cache context (see `state.py`); it starts fresh and is released at every
pipeline call's start and exit (`lifecycle.py`, through diffusers' reset of stateful hooks), at a
`cachedit.request` or `cachedit.refresh`, and where the timestep schedule of direct transformer
calls restarts (`runs.py`). Under a parallel plan, `reduce` averages the decision statistic over
ranks so every rank decides alike. The decision is the only host synchronisation per step (`.item()`),
besides one read of the timestep per transformer call that no `cache_context` names; both run
outside compiled blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from diffusers.hooks import ModelHook

from .. import hooks
from .._diffusers_compat import CacheContext, mark_stateful, original_forward
from ..adapters import Adapter, BlockIO, block_io, modulated_input, param_names
from ..config import CacheConfig
from . import per_sample
from .adapter_watch import HOOK_NAME as ADAPTER_HOOK, AdapterWatchHook
from .masks import resolve_mask
from .per_sample import PerSampleState
from .memo import apply_memo, remove_memo
from .policies import Probe, make_policy
from .runs import RunTracker
from .state import DEFAULT_CONTEXT, CallState, ContextStates

HOOK_NAME = "cachedit.cache"
BRANCH_HOOK = "cachedit.cache.branch"
TIMESTEP_ARGS = ("timestep", "t")  # what diffusers transformers call their timestep argument


class StackCache:
    """The cache of one block stack: its config, its blocks' roles, and its per-context states."""

    def __init__(self, config: CacheConfig, blocks: list[nn.Module], num_steps: Callable[[], int | None],
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.config = config
        self.blocks = blocks
        self.io: BlockIO = block_io(blocks[0])
        self.first_middle = config.Fn
        self.last_middle = len(blocks) - config.Bn - 1
        self.num_steps = num_steps
        self.reduce = reduce  # the statistic agreed over ranks: the reducer chain parallel plans add stages to
        state_cls = PerSampleState if config.per_sample else CallState
        self.states = ContextStates(state_cls, (config,),
                                    per_context=lambda name: {"threshold": config.threshold_for(name)})
        self.policy = make_policy(config.policy, dict(config.policy_options))
        self.modulated_input: Callable | None = None  # set from the adapter when the policy needs it
        self.timestep = None  # this transformer call's timestep argument, a tensor view never read on the host
        self.last_call: dict[str, dict] = {}  # reports of the last finished call, per context

    # -- step bookkeeping ----------------------------------------------------------------------
    def begin_step(self, st: CallState) -> None:
        info = self.states.context_info
        st.step = info.step_index if info is not None and info.step_index is not None else st.step + 1
        if st.num_steps is None:
            has = info is not None and info.num_inference_steps
            st.num_steps = info.num_inference_steps if has else self.num_steps()
            st.mask = resolve_mask(self.config.steps_mask, st.num_steps)
        if not st.cached_steps or st.cached_steps[-1] != st.step - 1:
            st.continuous = 0
        st.skipping = False
        st.blocks_total += len(self.blocks)
        if self.timestep is not None:  # calibrators with a timestep clock measure distances with it
            st.positions[st.step] = self.timestep

    def in_warmup(self, st: CallState) -> bool:
        warm = self.config.warmup_steps
        if st.mask is not None:
            leading = next((i for i, m in enumerate(st.mask) if m == 0), len(st.mask))
            warm = min(warm, leading)
        return st.step < warm and st.step % self.config.warmup_interval == 0

    def allowed(self, st: CallState) -> bool | None:
        """May this step cache at all? None: yes, subject to the threshold; True: cache unconditionally
        (a static step mask); False: compute."""
        cfg = self.config
        if self.in_warmup(st):
            return False
        if st.mask is not None and st.step < len(st.mask):
            if st.mask[st.step] == 1:
                return False
            if cfg.mask_mode == "static":
                return True
        # DBPrune asks once per block: a hit already recorded for this step does not count against it.
        this_step = 1 if st.cached_steps and st.cached_steps[-1] == st.step else 0
        if 0 <= cfg.max_cached_steps <= len(st.cached_steps) - this_step:
            return False
        if 0 <= cfg.max_continuous_cached_steps <= st.continuous - this_step:
            return False
        if cfg.max_accumulated_diff and st.accumulated_diff >= cfg.max_accumulated_diff:
            return False
        if st.threshold <= 0:
            return False
        return None

    def relative_l1(self, prev: torch.Tensor, cur: torch.Tensor) -> float:
        stats = torch.stack([(prev.float() - cur.float()).abs().mean(), prev.float().abs().mean()])
        if self.reduce is not None:
            stats = self.reduce(stats)
        return (stats[0] / stats[1]).item()

    def similar(self, st: CallState, prev: torch.Tensor | None, cur: torch.Tensor) -> bool:
        if prev is None or prev.shape != cur.shape:
            return False
        diff = self.relative_l1(prev, cur)
        st.diffs.setdefault(st.step, diff)
        if diff > 0:
            st.accumulated_diff += diff
        return diff < st.threshold

    def _fits(self, st: CallState, hidden: torch.Tensor, encoder: torch.Tensor | None) -> bool:
        """Stored residuals exist and match this step's shapes (a context's text length can change)."""
        h, e = st.hidden_residual.last, st.encoder_residual.last
        return h is not None and h.shape == hidden.shape and (e is None or encoder is None or e.shape == encoder.shape)

    def record_cached(self, st: CallState) -> None:
        if not st.cached_steps or st.cached_steps[-1] != st.step:
            st.cached_steps.append(st.step)
            st.continuous += 1

    def finish_call(self) -> None:
        """The end of a call or run: keep its reports, release its states."""
        if self.states.live():
            self.last_call = self.states.reports()
        self.states.reset()

    def drop_context(self, name: str) -> None:
        """Forget the state of context `name` (another rank runs that CFG branch from now on)."""
        self.states.drop(name)

    def new_run(self) -> None:
        """A new denoising run starts inside a transformer call: fresh states, the call's context kept."""
        context = self.states.context_info
        self.finish_call()
        self.states.set_context(context)

    # -- the block call ------------------------------------------------------------------------
    def modulated(self, block0: tuple) -> torch.Tensor | None:
        """The first block's modulated input (from its (module, args, kwargs)), where the policy reads it."""
        if self.policy.needs_modulated_input and self.modulated_input is not None:
            return self.modulated_input(*block0)
        return None

    def decide(self, st: CallState, hidden: torch.Tensor, encoder: torch.Tensor | None,
               modulated: torch.Tensor | None, view=None) -> Probe:
        """At the first cacheable block's entry: skip the cacheable blocks this step, or not. `view`:
        the cache as the policy sees it (default this one; per-sample mode passes one row's view)."""
        view = self if view is None else view
        probe = Probe(st.hidden_in, hidden, modulated)
        self.policy.observe(view, st, probe)
        verdict = view.allowed(st)
        if verdict is None:
            verdict = self.policy.skip(view, st, probe)
        if verdict and self._fits(st, hidden, encoder):
            st.skipping = True
            self.record_cached(st)
        return probe

    def run_block(self, index: int, forward, module, args, kwargs):
        if self.config.per_sample:  # one decision per row of the batch (per_sample.py)
            return per_sample.run_block(self, index, forward, module, args, kwargs)
        st: CallState = self.states.get_state()
        if index == 0:
            self.begin_step(st)
            st.hidden_in = self.io.inputs(module, args, kwargs)[0]
            st.block0 = (module, args, kwargs)
        if self.config.mode == "dbprune":
            return self._run_pruned(st, index, forward, module, args, kwargs)
        middle = self.first_middle <= index <= self.last_middle
        if index == self.first_middle and middle:
            st.middle_in = self.io.inputs(module, args, kwargs)
            st.probe = self.decide(st, *st.middle_in, self.modulated(st.block0))
        if middle and st.skipping:
            hidden, encoder = self.io.inputs(module, args, kwargs)
            if index == self.last_middle:
                hidden = hidden + st.hidden_residual.predict(st.step)
                if encoder is not None and self.io.return_encoder is not None and st.encoder_residual.last is not None:
                    encoder = encoder + st.encoder_residual.predict(st.step)
            return self.io.pack(hidden, encoder)
        out = forward(*args, **kwargs)
        st.blocks_computed += 1
        if index == self.last_middle and middle:
            hidden, encoder = self.io.outputs(out)
            st.hidden_residual.update(st.step, hidden - st.middle_in[0])
            if encoder is not None and st.middle_in[1] is not None and self.io.return_encoder is not None:
                st.encoder_residual.update(st.step, encoder - st.middle_in[1])
            self.policy.computed(self, st, st.probe, hidden)
        return out

    def _run_pruned(self, st: CallState, index: int, forward, module, args, kwargs):
        hidden, encoder = self.io.inputs(module, args, kwargs)
        prunable = self.first_middle <= index <= self.last_middle and index not in self.config.protected_blocks
        if prunable and index in st.block_residuals:
            verdict = self.allowed(st)
            if verdict is None:
                verdict = self.similar(st, st.block_inputs.get(index), hidden)
            if verdict:
                st.pruned.setdefault(st.step, []).append(index)
                self.record_cached(st)
                h_res, e_res = st.block_residuals[index]
                if encoder is not None and e_res is not None:
                    encoder = encoder + e_res
                return self.io.pack(hidden + h_res, encoder)
        out = forward(*args, **kwargs)
        st.blocks_computed += 1
        if prunable:
            h_out, e_out = self.io.outputs(out)
            e_res = e_out - encoder if e_out is not None and encoder is not None and e_out.shape == encoder.shape else None
            st.block_inputs[index] = hidden
            st.block_residuals[index] = (h_out - hidden, e_res)
        return out


class BlockCacheHook(ModelHook):
    """Sends one block's call through its stack's cache. The stack's first hook owns the
    per-context states (so diffusers' cache_context and reset reach them exactly once)."""

    def __init__(self, cache: StackCache, index: int) -> None:
        super().__init__()
        self.cache = cache
        self.index = index
        if index == 0:
            mark_stateful(self)
            self.states = cache.states

    def new_forward(self, module: nn.Module, *args, **kwargs):
        return self.cache.run_block(self.index, original_forward(self), module, args, kwargs)

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.cache.finish_call()
        return module


class CallContextHook(ModelHook):
    """Per transformer call: names the CFG branch of a call no `cache_context` names, and, for a
    transformer called directly (no pipeline call or `cachedit.request` in progress), starts fresh
    state where the timestep schedule restarts (`runs.py`: from timesteps, never from addresses).

    Pipelines that name their calls pay nothing here; otherwise the call's timestep is read once (a
    host read of one number; on an accelerator, one synchronisation per transformer call).
    """

    def __init__(self, caches: list[StackCache], infer_branches: bool, scope=None, memo=()) -> None:
        super().__init__()
        mark_stateful(self)  # the run it follows ends with the pipeline call (diffusers' reset, the lifecycle)
        self.caches = caches
        self.memo = list(memo)  # (module, MemoHook): the per-call memos, fresh with each new run
        self.infer_branches = infer_branches  # False: unnamed calls share one state (batched CFG)
        self.scope = scope  # lifecycle.Scope: whether call boundaries are known
        self.runs = RunTracker()

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        params = param_names(type(module))
        self.timestep_arg = next((p for p in TIMESTEP_ARGS if p in params), None)
        self.timestep_index = params.index(self.timestep_arg) if self.timestep_arg is not None else None
        return module

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.runs.clear()
        return module

    def _timestep_value(self, args, kwargs):
        """The call's timestep as given: a 0-dim tensor view (no host read), a number, or None."""
        value = kwargs.get(self.timestep_arg) if self.timestep_arg is not None else None
        if value is None and self.timestep_index is not None and self.timestep_index < len(args):
            value = args[self.timestep_index]
        if isinstance(value, torch.Tensor):
            return value.reshape(-1)[0] if value.numel() else None
        return float(value) if isinstance(value, (int, float)) else None

    def _timestep(self, args, kwargs) -> float | None:
        value = self._timestep_value(args, kwargs)
        return None if value is None else float(value)

    def new_forward(self, module: nn.Module, *args, **kwargs):
        timestep = self._timestep_value(args, kwargs)
        for cache in self.caches:
            cache.timestep = timestep
        context = self.caches[0].states.context_info  # set by the pipeline's cache_context, if any
        direct = self.scope is None or not self.scope.active
        if not direct and (context is not None or not self.infer_branches):
            return self._run(None, args, kwargs)
        timestep = self._timestep(args, kwargs)
        branch, restart = None, False
        if timestep is not None:
            branch, restart = self.runs.observe(timestep, context.name if context is not None else None)
        if restart and direct:
            for cache in self.caches:
                cache.new_run()
            for _, memo in self.memo:
                memo.reset_state(None)
        if context is not None:
            return self._run(None, args, kwargs)
        return self._run(branch if self.infer_branches and branch is not None else DEFAULT_CONTEXT, args, kwargs)

    def _run(self, name: str | None, args, kwargs):
        """The transformer's forward, with the cache context `name` set for its duration (None: as it is)."""
        if name is None:
            return original_forward(self)(*args, **kwargs)
        for cache in self.caches:
            cache.states.set_context(CacheContext(name))
        try:
            return original_forward(self)(*args, **kwargs)
        finally:
            for cache in self.caches:
                cache.states.set_context(None)


@dataclass
class CachedTransformer:
    """What `apply_cache` put on one transformer: a cache per block stack and the memoized pure modules."""

    stacks: list[StackCache] = field(default_factory=list)
    memo: list = field(default_factory=list)  # (module, MemoHook)


def apply_cache(transformer: nn.Module, adapter: Adapter, config: CacheConfig, num_steps, scope=None,
                reduce=None) -> CachedTransformer:
    """Hook every block stack of `transformer`; `scope` (lifecycle.Scope) says when call boundaries are known,
    `reduce` agrees each decision statistic over ranks (None: one process decides alone)."""
    applied = CachedTransformer()
    try:
        for blocks in adapter.stacks(transformer):
            cache = StackCache(config, blocks, num_steps, reduce)
            cache.modulated_input = modulated_input
            applied.stacks.append(cache)
            for i, block in enumerate(blocks):
                hooks.attach(block, BlockCacheHook(cache, i), HOOK_NAME)
        applied.memo = apply_memo(transformer, adapter.pure_modules)
        hooks.attach(transformer, CallContextHook(applied.stacks, adapter.text_arg is not None, scope, applied.memo),
                     BRANCH_HOOK)
        hooks.attach(transformer, AdapterWatchHook(applied.stacks), ADAPTER_HOOK)  # adapter changes: fresh state
    except BaseException:
        remove_cache(transformer, applied)
        raise
    return applied


def remove_cache(transformer: nn.Module, applied: CachedTransformer) -> None:
    remove_memo(applied.memo)
    hooks.detach(transformer, ADAPTER_HOOK)
    hooks.detach(transformer, BRANCH_HOOK)
    for cache in applied.stacks:
        for block in cache.blocks:
            hooks.detach(block, HOOK_NAME)
    applied.memo, applied.stacks = [], []
