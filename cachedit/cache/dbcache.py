"""DBCache and DBPrune as diffusers hooks on each transformer block of a stack.

Per step, the first Fn blocks run; at the entry of the first middle block the config's policy
(`policies.py`: DBCache's first-blocks residual change by default) decides whether the middle
blocks run or are skipped, in which case their residual from the last computed step (or a
calibrator's forecast of it) is added instead. The last Bn blocks always run. DBPrune (per block): each middle block not protected is skipped on
its own when its input changed by less than the threshold, reusing its own last residual.

State lives per diffusers cache context (see `state.py`) and is reset by diffusers' own
`maybe_free_model_hooks()` at the end of every pipeline call (or `cachedit.refresh`). Under a
parallel plan, `reduce` averages the decision statistic over ranks so every rank decides alike.
The decision is the only host synchronisation (`.item()`), and it runs outside compiled blocks.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import CacheContext

from .. import hooks
from ..adapters import Adapter, BlockIO, _param_names, block_io, modulated_input
from ..config import CacheConfig
from .masks import resolve_mask
from .memo import apply_memo, remove_memo
from .policies import Probe, make_policy
from .state import CallState, ContextStates

HOOK_NAME = "cachedit.cache"
BRANCH_HOOK = "cachedit.cache.branch"


class StackCache:
    """The cache of one block stack: its config, its blocks' roles, and its per-context states."""

    def __init__(self, config: CacheConfig, blocks: list[nn.Module], num_steps: Callable[[], int | None]):
        self.config = config
        self.blocks = blocks
        self.io: BlockIO = block_io(blocks[0])
        self.first_middle = config.Fn
        self.last_middle = len(blocks) - config.Bn - 1
        self.num_steps = num_steps
        self.reduce: Callable[[torch.Tensor], torch.Tensor] | None = None  # set by parallel plans
        self.states = ContextStates(CallState, (config.calibrator, config.taylorseer_order))
        self.policy = make_policy(config.policy, dict(config.policy_options))
        self.modulated_input: Callable | None = None  # set from the adapter when the policy needs it
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
        if cfg.residual_diff_threshold <= 0:
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
        return diff < self.config.residual_diff_threshold

    def _fits(self, st: CallState, hidden: torch.Tensor, encoder: torch.Tensor | None) -> bool:
        """Stored residuals exist and match this step's shapes (a context's text length can change)."""
        h, e = st.hidden_residual.last, st.encoder_residual.last
        return h is not None and h.shape == hidden.shape and (e is None or encoder is None or e.shape == encoder.shape)

    def record_cached(self, st: CallState) -> None:
        if not st.cached_steps or st.cached_steps[-1] != st.step:
            st.cached_steps.append(st.step)
            st.continuous += 1

    def finish_call(self) -> None:
        if self.states._state_cache:
            self.last_call = self.states.reports()
        self.states.reset()

    # -- the block call ------------------------------------------------------------------------
    def decide(self, st: CallState, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Probe:
        """At the first cacheable block's entry: skip the cacheable blocks this step, or not."""
        modulated = None
        if self.policy.needs_modulated_input and self.modulated_input is not None:
            modulated = self.modulated_input(*st.block0)
        probe = Probe(st.hidden_in, hidden, modulated)
        self.policy.observe(self, st, probe)
        verdict = self.allowed(st)
        if verdict is None:
            verdict = self.policy.skip(self, st, probe)
        if verdict and self._fits(st, hidden, encoder):
            st.skipping = True
            self.record_cached(st)
        return probe

    def run_block(self, index: int, forward, module, args, kwargs):
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
            st.probe = self.decide(st, *st.middle_in)
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
            self._is_stateful = True
            self.states = cache.states

    def new_forward(self, module: nn.Module, *args, **kwargs):
        return self.cache.run_block(self.index, self.fn_ref.original_forward, module, args, kwargs)

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.cache.finish_call()
        return module


class BranchContextHook(ModelHook):
    """Names the CFG branch of a transformer call that no `cache_context` names.

    Most diffusers pipelines wrap each call in `transformer.cache_context("cond"/"uncond")`. Some
    (Chroma, Lumina2) do not; their branches differ by the text embedding tensor they pass, the
    same tensor at every step, so that tensor's identity names the branch. This also holds when a
    pipeline drops the unconditional call for some steps, which counting calls would not survive.
    """

    def __init__(self, caches: list[StackCache], text_arg: str | None) -> None:
        super().__init__()
        self.caches = caches
        self.text_arg = text_arg

    def new_forward(self, module: nn.Module, *args, **kwargs):
        states = [c.states for c in self.caches]
        if any(s.context_info is not None for s in states):
            return self.fn_ref.original_forward(*args, **kwargs)
        text = None
        if self.text_arg is not None:
            text = kwargs.get(self.text_arg)
            params = _param_names(type(module))
            if text is None and self.text_arg in params and params.index(self.text_arg) < len(args):
                text = args[params.index(self.text_arg)]
        name = f"text@{text.data_ptr():x}:{tuple(text.shape)}" if isinstance(text, torch.Tensor) else "default"
        for s in states:
            s.set_context(CacheContext(name))
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            for s in states:
                s.set_context(None)


def apply_cache(transformer: nn.Module, adapter: Adapter, config: CacheConfig, num_steps) -> list[StackCache]:
    stacks = adapter.stacks(transformer)
    caches = []
    for blocks in stacks:
        cache = StackCache(config, blocks, num_steps)
        cache.modulated_input = modulated_input
        for i, block in enumerate(blocks):
            hooks.attach(block, BlockCacheHook(cache, i), HOOK_NAME)
        caches.append(cache)
    hooks.attach(transformer, BranchContextHook(caches, adapter.text_arg), BRANCH_HOOK)
    caches[0].memo = apply_memo(transformer, adapter.pure_modules)
    return caches


def remove_cache(transformer: nn.Module, caches: list[StackCache]) -> None:
    remove_memo(getattr(caches[0], "memo", []) if caches else [])
    hooks.detach(transformer, BRANCH_HOOK)
    for cache in caches:
        for block in cache.blocks:
            hooks.detach(block, HOOK_NAME)
