"""Every use of a diffusers name that diffusers does not export, in one module.

cachedit builds on diffusers' hook machinery (`HookRegistry`, `ModelHook`, `cache_context`) and on what its models
declare (`_cp_plan`, `_tp_plan`, the transformer-block registry). Part of that is private: underscored attributes,
implementation modules, the internals of `StateManager`. Each such reach is one small function (or one re-export)
here, saying what it touches and why, so a diffusers release that moves something breaks in this file, by name,
and the tested range (`SUPPORTED`) can widen one release at a time. Everything else imports diffusers' public names
(`diffusers.X`, `diffusers.hooks.X`, ...) directly; `tests/test_diffusers_compat.py` checks that nothing else
imports a private one.

Version check, at import: a diffusers older than `SUPPORTED` raises ImportError (the reaches below are known not to
hold there: before 0.41.0 `StateManager` keeps a context *name*, not a `CacheContext`, and `HookRegistry` has no
`invalidate_child_registries_cache`, so caching would fail mid-call or, worse, mix contexts); a newer one warns
once (releases usually keep these internals, and refusing every new diffusers until it is re-tested would cost
more than a warning). `CACHEDIT_ALLOW_ANY_DIFFUSERS=1` turns the error into the warning, to try a release.
"""

from __future__ import annotations

import os
import warnings

import diffusers
import torch.nn as nn
from packaging.version import Version

# These four come from implementation modules (not re-exported by a diffusers package); the names are stable
# across the supported range. StateManager / BaseState: per-context hook state that diffusers' `cache_context`
# reaches (it sets the context on every StateManager attribute of a stateful hook). CacheContext: what it sets.
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager
# Context-parallel plan entries (the vocabulary of a model's `_cp_plan`), which cachedit's own plans reuse.
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
# Tensor-parallel styles for fused projections (the vocabulary of a model's `_tp_plan`).
from diffusers.hooks.tensor_parallel import PackedColwiseParallel, PackedRowwiseParallel
# A transformer's return type, to rebuild one after exchanging CFG halves.
from diffusers.models.modeling_outputs import Transformer2DModelOutput
# Rotary embedding as diffusers applies it, so async Ulysses rotates exactly as the model would.
from diffusers.models.embeddings import apply_rotary_emb

__all__ = ["SUPPORTED", "BaseState", "CacheContext", "ContextParallelInput", "ContextParallelOutput",
           "PackedColwiseParallel", "PackedRowwiseParallel", "StateManager", "Transformer2DModelOutput",
           "apply_rotary_emb", "block_metadata", "cache_config", "check_version", "child_registries", "clear_states",
           "context_states", "cp_plan", "current_context", "drop_hook_registry", "hook_registry",
           "hunyuan_video_prompt_template", "invalidate_child_registries", "keep_in_fp32_modules", "mark_stateful",
           "new_state", "original_forward", "qwen_rotary", "tp_plan"]

SUPPORTED = ">=0.41.0,<0.43"
_OLDEST, _NEXT = (0, 41), (0, 43)  # the same range, as release tuples
ALLOW_ENV = "CACHEDIT_ALLOW_ANY_DIFFUSERS"


def check_version(version: str) -> None:
    """ImportError below `SUPPORTED` (unless `CACHEDIT_ALLOW_ANY_DIFFUSERS=1`), a UserWarning above it."""
    release = Version(version).release[:2]
    if _OLDEST <= release < _NEXT:
        return
    message = (f"cachedit is tested with diffusers{SUPPORTED}, found diffusers {version}; "
               f"install a tested one: pip install 'diffusers{SUPPORTED}'")
    if release < _OLDEST and os.environ.get(ALLOW_ENV) != "1":
        raise ImportError(f"{message} (or set {ALLOW_ENV}=1 to try this one anyway)")
    warnings.warn(f"{message}; going ahead untested", UserWarning, stacklevel=2)


check_version(diffusers.__version__)


# --- hook registries -----------------------------------------------------------------------------------------------

# the names diffusers' group offloading registers its hooks under (diffusers/hooks/group_offloading.py)
GROUP_OFFLOADING_HOOKS = ("group_offloading", "lazy_prefetch_group_offloading")


def hook_registry(module: nn.Module):
    """The `HookRegistry` diffusers keeps in `module._diffusers_hook`, or None. `check_if_exists_or_initialize` would
    create one; detaching, resetting and checking must look without creating."""
    return getattr(module, "_diffusers_hook", None)


def drop_hook_registry(module: nn.Module) -> None:
    """Delete `module._diffusers_hook`: diffusers leaves an emptied registry in place, and a module we hooked
    should end as we found it."""
    del module._diffusers_hook


def child_registries(registry) -> list:
    """The child registries `cache_context` reaches (`HookRegistry._get_child_registries`, cached by diffusers),
    so a reset reaches the same hooks without walking the module tree."""
    return registry._get_child_registries()


def invalidate_child_registries(module: nn.Module) -> None:
    """Make diffusers rebuild its cached list of hooked children under `module`: after hooks are added or removed
    below it, `cache_context` must see the current ones."""
    registry = hook_registry(module)
    if registry is not None:
        registry.invalidate_child_registries_cache()


def original_forward(hook):
    """The forward a hook wraps: `register_hook` stores it in the hook's `fn_ref` (no public accessor)."""
    return hook.fn_ref.original_forward


def mark_stateful(hook) -> None:
    """Make diffusers treat `hook` as stateful (`_is_stateful`): only such hooks get `cache_context` set on their
    StateManager attributes and `reset_state` called by `reset_stateful_hooks`."""
    hook._is_stateful = True


def cache_config(model: nn.Module):
    """The config of the cache diffusers' own `enable_cache` put on `model` (`model._cache_config`), or None."""
    return getattr(model, "_cache_config", None)


# --- StateManager internals ----------------------------------------------------------------------------------------

def current_context(manager: StateManager) -> CacheContext | None:
    """The `CacheContext` diffusers' `cache_context` last set on `manager` (`_context`); None outside one. The public
    `context` property raises instead, and cachedit falls back to a default context there."""
    return manager._context


def context_states(manager: StateManager) -> dict:
    """`manager`'s states by context name (`_state_cache`), the live dict: cachedit bounds it, reports it and
    drops one context's state when another rank takes that CFG branch."""
    return manager._state_cache


def new_state(manager: StateManager, **extra) -> BaseState:
    """A fresh state built as `StateManager.get_state` builds one (`_state_cls(*_init_args, **_init_kwargs)`), with
    per-context keyword arguments added."""
    return manager._state_cls(*manager._init_args, **manager._init_kwargs, **extra)


def clear_states(manager: StateManager) -> None:
    """Forget every state and the current context, without `StateManager.reset`'s per-state `reset()` calls."""
    manager._state_cache.clear()
    manager._context = None


# --- what models declare -------------------------------------------------------------------------------------------

# Block declarations diffusers 0.42 added, as (hidden, encoder) return indices, for the older releases in range.
_BLOCKS_DECLARED_LATER = {"Flux2TransformerBlock": (1, 0), "Flux2SingleTransformerBlock": (0, None)}


def block_metadata(block_class: type):
    """diffusers' declaration of how a transformer block class is called and what it returns
    (`TransformerBlockRegistry`, in `diffusers.hooks._helpers`), or None for an undeclared class. Where the installed
    diffusers predates a declaration (FLUX.2's blocks, before 0.42), the later release's declaration."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    TransformerBlockRegistry._register()
    meta = TransformerBlockRegistry._registry.get(block_class)
    if meta is None and block_class.__name__ in _BLOCKS_DECLARED_LATER:
        hidden, encoder = _BLOCKS_DECLARED_LATER[block_class.__name__]
        meta = TransformerBlockMetadata(return_hidden_states_index=hidden, return_encoder_hidden_states_index=encoder)
    return meta


def cp_plan(model_class: type) -> dict | None:
    """The model class's context-parallel plan (`_cp_plan`), or None where it declares none."""
    return getattr(model_class, "_cp_plan", None)


def tp_plan(model_class: type) -> dict:
    """The model class's tensor-parallel plan (`_tp_plan`): linear name pattern -> style."""
    return model_class._tp_plan


def keep_in_fp32_modules(model: nn.Module) -> tuple:
    """The module names `model` keeps in float32 whatever its dtype (`_keep_in_fp32_modules`)."""
    return tuple(getattr(model, "_keep_in_fp32_modules", None) or ())


def qwen_rotary():
    """Qwen-Image's own rotary embedding (`apply_rotary_emb_qwen`, in its model module)."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    return apply_rotary_emb_qwen


def hunyuan_video_prompt_template() -> dict:
    """HunyuanVideoPipeline's default prompt template (in its pipeline module), which the tiny tokenizer must cover."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return DEFAULT_PROMPT_TEMPLATE
