"""Frozen, validated configs. Every check raises ValueError naming the field and what is allowed.

Validation happens in two stages, both before anything is modified: each config checks itself
when constructed, and `accelerate` checks the configs against each other and the pipeline.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

from .cache.masks import MASK_FRACTIONS


def _fail(cls: str, name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{cls}.{name}={value!r} is invalid; allowed values: {allowed}")


def _check_int(cls: str, name: str, value: Any, minimum: int, special: tuple = ()) -> None:
    if value in special and not isinstance(value, bool):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = f" or {', '.join(map(str, special))}" if special else ""
        _fail(cls, name, value, f"an integer >= {minimum}{extra}")


def _check_number(cls: str, name: str, value: Any, positive: bool = False) -> None:
    """A finite real number >= 0 (> 0 when `positive`): NaN and inf are refused, they would silently
    disable every comparison made with them."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            value < 0 or (positive and value == 0):
        _fail(cls, name, value, f"a finite number {'>' if positive else '>='} 0")


def _check_choice(cls: str, name: str, value: Any, allowed: tuple) -> None:
    """One of `allowed`; where the choices are booleans, a bool (1 == True would slip through `in`)."""
    is_bool_choice = any(isinstance(a, bool) for a in allowed)
    if (is_bool_choice and value is not None and not isinstance(value, bool)) or value not in allowed:
        _fail(cls, name, value, ", ".join(repr(a) for a in allowed))


def _check_sequence(cls: str, name: str, value: Any, allowed: str, kinds: tuple = (list, tuple)) -> None:
    if not isinstance(value, kinds):
        _fail(cls, name, value, allowed)


CACHE_MODES = ("dbcache", "dbprune")
MASK_POLICIES = tuple(MASK_FRACTIONS)  # the step-mask presets' names
MASK_MODES = ("dynamic", "static")


@dataclass(frozen=True)
class CacheConfig:
    """Block caching. "dbcache": the first `Fn` and last `Bn` blocks always run; the middle ones are
    skipped when the first blocks' residual changed by less than `residual_diff_threshold` (relative
    L1) since the last computed step, and their residual is reused (or forecast by `calibrator`).
    "dbprune": each middle block not in `protected_blocks` is skipped on its own when its input
    changed by less than the threshold. Warmup, step masks and the max-cached limits bound both.
    `branch_thresholds` gives a cache context (CFG branch: "cond", "uncond", or "branch0" / "branch1" where
    the pipeline names none) its own threshold; a CFG batched into one call is one context."""

    Fn: int = 1
    Bn: int = 0
    residual_diff_threshold: float = 0.08
    warmup_steps: int = 8
    warmup_interval: int = 1
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    max_accumulated_diff: float | None = None
    mode: str = "dbcache"
    protected_blocks: tuple[int, ...] = ()
    calibrator: str | None = None
    taylorseer_order: int = 1
    steps_mask: tuple[int, ...] | str | None = None  # explicit 1=compute/0=may cache, or a policy name
    mask_mode: str = "dynamic"  # "static": masked steps always cache; "dynamic": they still check the threshold
    policy: str = "dbcache"  # the skip signal: dbcache, teacache, magcache, easycache (cachedit.cache.policies)
    policy_options: dict = field(default_factory=dict)
    branch_thresholds: dict = field(default_factory=dict)  # cache context -> its own threshold, e.g. {"uncond": 0.3}
    per_sample: bool = False  # decide per row of a batch (cache/per_sample.py); False: one decision per batch

    def __post_init__(self) -> None:
        n = "CacheConfig"
        _check_int(n, "Fn", self.Fn, 0)
        _check_int(n, "Bn", self.Bn, 0)
        _check_number(n, "residual_diff_threshold", self.residual_diff_threshold)
        _check_int(n, "warmup_steps", self.warmup_steps, 0)
        _check_int(n, "warmup_interval", self.warmup_interval, 1)
        _check_int(n, "max_cached_steps", self.max_cached_steps, 0, special=(-1,))
        _check_int(n, "max_continuous_cached_steps", self.max_continuous_cached_steps, 0, special=(-1,))
        if self.max_accumulated_diff is not None:  # 0 would allow no accumulated change at all: refused
            _check_number(n, "max_accumulated_diff", self.max_accumulated_diff, positive=True)
        _check_choice(n, "mode", self.mode, CACHE_MODES)
        _check_sequence(n, "protected_blocks", self.protected_blocks, "a tuple of block indices >= 0",
                        (list, tuple, set, frozenset, range))
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.protected_blocks):
            _fail(n, "protected_blocks", self.protected_blocks, "a tuple of block indices >= 0")
        object.__setattr__(self, "protected_blocks", tuple(sorted(set(self.protected_blocks))))
        from .cache.calibrators import CALIBRATORS  # the live registry: users may add their own

        _check_choice(n, "calibrator", self.calibrator, (None, *CALIBRATORS.names()))
        _check_int(n, "taylorseer_order", self.taylorseer_order, 1)
        if self.calibrator is not None and self.mode != "dbcache":
            _fail(n, "calibrator", self.calibrator, "None when mode='dbprune' (calibrators forecast the DBCache residual)")
        if isinstance(self.steps_mask, str):
            _check_choice(n, "steps_mask", self.steps_mask, MASK_POLICIES)
        elif self.steps_mask is not None:
            _check_sequence(n, "steps_mask", self.steps_mask, f"None, one of {MASK_POLICIES}, or a non-empty "
                            "list or tuple of 0/1")
            if not self.steps_mask or not all(m in (0, 1) and not isinstance(m, bool) for m in self.steps_mask):
                _fail(n, "steps_mask", self.steps_mask, f"None, one of {MASK_POLICIES}, or a non-empty sequence of 0/1")
            object.__setattr__(self, "steps_mask", tuple(self.steps_mask))
        _check_choice(n, "mask_mode", self.mask_mode, MASK_MODES)
        from .cache.policies import POLICIES, make_policy  # the live registry: users may add their own

        _check_choice(n, "policy", self.policy, tuple(POLICIES.names()))
        if not isinstance(self.policy_options, dict) or not all(isinstance(k, str) for k in self.policy_options):
            _fail(n, "policy_options", self.policy_options, "a dict of the policy's options")
        object.__setattr__(self, "policy_options", copy.deepcopy(self.policy_options))  # the caller's stays theirs
        if self.policy != "dbcache" and self.mode != "dbcache":
            _fail(n, "policy", self.policy, "'dbcache' when mode='dbprune' (pruning decides per block)")
        if not isinstance(self.branch_thresholds, dict) or not all(isinstance(k, str) and k for k in self.branch_thresholds):
            _fail(n, "branch_thresholds", self.branch_thresholds, "a dict of cache context name (e.g. 'cond', 'uncond') "
                  "-> threshold")
        for name, value in self.branch_thresholds.items():
            _check_number(n, f"branch_thresholds[{name!r}]", value)
        object.__setattr__(self, "branch_thresholds", {k: float(v) for k, v in self.branch_thresholds.items()})
        make_policy(self.policy, dict(self.policy_options)).check_config(self)
        _check_choice(n, "per_sample", self.per_sample, (False, True))
        if self.per_sample and self.mode != "dbcache":
            _fail(n, "per_sample", self.per_sample, "False when mode='dbprune' (per-sample decisions are built for "
                  "mode='dbcache')")

    def threshold_for(self, context: str) -> float:
        """The threshold of one cache context (CFG branch): its own in `branch_thresholds`, else the common one."""
        return self.branch_thresholds.get(context, self.residual_diff_threshold)

    def check_blocks(self, num_blocks: int) -> None:
        if self.Fn + self.Bn > num_blocks:
            raise ValueError(f"CacheConfig.Fn + CacheConfig.Bn = {self.Fn + self.Bn} exceeds the model's "
                             f"{num_blocks} transformer blocks; allowed: Fn + Bn <= {num_blocks}")
        bad = [i for i in self.protected_blocks if i >= num_blocks]
        if bad:
            raise ValueError(f"CacheConfig.protected_blocks={self.protected_blocks} names blocks {bad} but the "
                             f"model has {num_blocks}; allowed: indices 0..{num_blocks - 1}")

    def check_stacks(self, sizes: list[int], where: str) -> None:
        """Check the config against the block stacks of one transformer (`where` names it): each stack
        must fit Fn + Bn, and some stack must have a block the cache may skip, or it could never cache."""
        for size in sizes:
            self.check_blocks(size)
        skippable = sum(len(set(range(self.Fn, size - self.Bn)) - (set(self.protected_blocks)
                                                                    if self.mode == "dbprune" else set()))
                        for size in sizes)
        if sizes and not skippable:
            raise ValueError(f"CacheConfig.Fn={self.Fn}, Bn={self.Bn}" + (f", protected_blocks={self.protected_blocks}"
                             if self.mode == "dbprune" else "") + f" leave no block of {where} (stacks of "
                             f"{sizes} blocks) that the cache may skip, so it could never cache; allowed: "
                             f"Fn + Bn < {max(sizes)}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "CacheConfig":
        """Named starting points: "fbcache" (first-block cache, F1B0), "fast", "balanced", "quality"."""
        if name not in CACHE_PRESETS:
            raise ValueError(f"cache={name!r} is not a preset; allowed values: {', '.join(map(repr, CACHE_PRESETS))}")
        return cls(**{**CACHE_PRESETS[name], **overrides})


CACHE_PRESETS = {
    "fbcache": dict(Fn=1, Bn=0, residual_diff_threshold=0.08, warmup_steps=0),
    "fast": dict(Fn=1, Bn=0, residual_diff_threshold=0.2, warmup_steps=4, max_continuous_cached_steps=3),
    "balanced": dict(Fn=1, Bn=0, residual_diff_threshold=0.12, warmup_steps=4, max_continuous_cached_steps=2),
    "quality": dict(Fn=2, Bn=1, residual_diff_threshold=0.06, warmup_steps=6, max_continuous_cached_steps=2),
}


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of each parallel dimension; their product is the number of processes."""

    ulysses: int = 1
    ring: int = 1
    tensor: int = 1
    cfg: int = 1
    fp8_comm: bool = False  # Ulysses all-to-alls carry per-token float8_e4m3fn codes + scales
    async_ulysses: bool = False  # each q/k/v all-to-all overlaps the next projection (parallel/async_ulysses.py)
    text_encoder: bool = False  # shard the pipeline's text encoders tensor-parallel over every rank
    vae: bool = False  # split the VAE decode spatially over every rank
    controlnet: bool = False  # give the pipeline's ControlNet the transformer's parallel plan

    def __post_init__(self) -> None:
        for name in ("ulysses", "ring", "tensor", "cfg"):
            _check_int("ParallelConfig", name, getattr(self, name), 1)
        if self.cfg not in (1, 2):
            _fail("ParallelConfig", "cfg", self.cfg, "1, 2")
        for name in ("fp8_comm", "async_ulysses"):
            _check_choice("ParallelConfig", name, getattr(self, name), (False, True))
            if getattr(self, name) and self.ulysses == 1:
                _fail("ParallelConfig", name, getattr(self, name), "False when ulysses == 1 (it changes the "
                      "Ulysses all-to-alls only)")
        for name in ("text_encoder", "vae", "controlnet"):
            _check_choice("ParallelConfig", name, getattr(self, name), (False, True))
            if getattr(self, name) and self.world_size == 1:
                _fail("ParallelConfig", name, getattr(self, name), "False when every degree is 1 (nothing to "
                      "split it over)")

    @property
    def world_size(self) -> int:
        return self.ulysses * self.ring * self.tensor * self.cfg

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


QUANT_SCHEMES = ("fp8", "int8")
QUANT_GRANULARITIES = ("tensor", "row")
# Embedders and the final projection stay in float; exclude "*norm*" too to keep AdaLN modulation
# linears in float (on the reference model that costs 0.12x of bf16 memory for no PSNR gained).
DEFAULT_QUANT_EXCLUDE = ("*embed*", "proj_out")


@dataclass(frozen=True)
class QuantConfig:
    """Which linears of the transformer run quantized, and how."""

    scheme: str = "fp8"
    granularity: str = "row"
    weight_only: bool = False
    exclude: tuple[str, ...] = DEFAULT_QUANT_EXCLUDE
    keep_original: bool = True  # keep float weights on the host so disable() restores them exactly

    def __post_init__(self) -> None:
        _check_choice("QuantConfig", "scheme", self.scheme, QUANT_SCHEMES)
        _check_choice("QuantConfig", "granularity", self.granularity, QUANT_GRANULARITIES)
        _check_choice("QuantConfig", "weight_only", self.weight_only, (False, True))
        _check_choice("QuantConfig", "keep_original", self.keep_original, (False, True))
        if self.weight_only and self.scheme != "int8":
            _fail("QuantConfig", "weight_only", self.weight_only, "True only with scheme='int8'")
        if not isinstance(self.exclude, (list, tuple)) or not all(isinstance(p, str) for p in self.exclude):
            _fail("QuantConfig", "exclude", self.exclude, "a tuple of fnmatch patterns over module names")
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def excludes(self, module_name: str) -> bool:
        return any(fnmatch.fnmatch(module_name, p) for p in self.exclude)


COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileConfig:
    """torch.compile applied to each transformer block; the backend plugin supplies the defaults."""

    mode: str | None = None
    fullgraph: bool = False
    dynamic: bool | None = None
    backend: str | None = None  # torch.compile backend; None means the cachedit backend's choice
    options: dict = field(default_factory=dict)
    fuse_qkv: bool | None = None  # one GEMM for q/k/v where the model supports it; None: the backend's choice

    def __post_init__(self) -> None:
        _check_choice("CompileConfig", "mode", self.mode, COMPILE_MODES)
        _check_choice("CompileConfig", "fuse_qkv", self.fuse_qkv, (None, False, True))
        _check_choice("CompileConfig", "fullgraph", self.fullgraph, (False, True))
        _check_choice("CompileConfig", "dynamic", self.dynamic, (None, False, True))
        if self.backend is not None and (not isinstance(self.backend, str) or not self.backend):
            _fail("CompileConfig", "backend", self.backend, "None or a torch.compile backend name")
        if not isinstance(self.options, dict) or not all(isinstance(k, str) for k in self.options):
            _fail("CompileConfig", "options", self.options, "a dict of inductor options")
        object.__setattr__(self, "options", copy.deepcopy(self.options))  # the caller's dict stays theirs
        if self.mode is not None and self.options:
            _fail("CompileConfig", "options", self.options, "empty when mode is set (torch.compile takes one of them)")

    def __hash__(self) -> int:
        return hash((self.mode, self.fullgraph, self.dynamic, self.backend, tuple(sorted(self.options.items())),
                     self.fuse_qkv))


@dataclass(frozen=True)
class CompileTarget:
    """What `cachedit_compile_options` is asked about: the module kind and the user's config."""

    kind: str  # "transformer_block"
    family: str
    config: CompileConfig


def coerce(value: Any, cls: type, field_name: str):
    """Accept None, an instance, a dict of fields, True (defaults) or, where the config has presets, a preset name."""
    if value is None or value is False:
        return None
    if isinstance(value, cls):  # built again, so one changed with object.__setattr__ or by hand is rechecked
        try:
            return dataclasses.replace(value)
        except AttributeError as exc:
            raise ValueError(f"{field_name}: this {cls.__name__} lacks a field ({exc}); build it with "
                             f"cachedit.{cls.__name__}(...)") from None
    if value is True:
        return cls()
    if isinstance(value, str) and hasattr(cls, "preset"):
        return cls.preset(value)
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{field_name}: unknown field(s) {unknown}; allowed fields: {sorted(known)}")
        return cls(**value)
    raise ValueError(f"{field_name}={value!r} is invalid; allowed values: None, True, a dict of "
                     f"{cls.__name__} fields, or a cachedit.{cls.__name__}")
