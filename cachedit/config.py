"""Frozen, validated configs. Every check raises ValueError naming the field and what is allowed.

Validation happens in two stages, both before anything is modified: each config checks itself
when constructed, and `accelerate` checks the configs against each other and the pipeline.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any


def _fail(cls: str, name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{cls}.{name}={value!r} is invalid; allowed values: {allowed}")


def _check_int(cls: str, name: str, value: Any, minimum: int, special: tuple = ()) -> None:
    if value in special and not isinstance(value, bool):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = f" or {', '.join(map(str, special))}" if special else ""
        _fail(cls, name, value, f"an integer >= {minimum}{extra}")


def _check_choice(cls: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        _fail(cls, name, value, ", ".join(repr(a) for a in allowed))


@dataclass(frozen=True)
class CacheConfig:
    """DBCache-style block caching: the first `Fn` and last `Bn` blocks always run; the middle
    ones are skipped when the first blocks' residual changed by less than the threshold."""

    Fn: int = 1
    Bn: int = 0
    residual_diff_threshold: float = 0.08
    warmup_steps: int = 8
    warmup_interval: int = 1
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1

    def __post_init__(self) -> None:
        n = "CacheConfig"
        _check_int(n, "Fn", self.Fn, 1)
        _check_int(n, "Bn", self.Bn, 0)
        if isinstance(self.residual_diff_threshold, bool) or not isinstance(self.residual_diff_threshold, (int, float)) \
                or self.residual_diff_threshold < 0:
            _fail(n, "residual_diff_threshold", self.residual_diff_threshold, "a number >= 0")
        _check_int(n, "warmup_steps", self.warmup_steps, 0)
        _check_int(n, "warmup_interval", self.warmup_interval, 1)
        _check_int(n, "max_cached_steps", self.max_cached_steps, 0, special=(-1,))
        _check_int(n, "max_continuous_cached_steps", self.max_continuous_cached_steps, 0, special=(-1,))

    def check_blocks(self, num_blocks: int) -> None:
        if self.Fn + self.Bn > num_blocks:
            raise ValueError(f"CacheConfig.Fn + CacheConfig.Bn = {self.Fn + self.Bn} exceeds the model's "
                             f"{num_blocks} transformer blocks; allowed: Fn + Bn <= {num_blocks}")


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of each parallel dimension; their product is the number of processes."""

    ulysses: int = 1
    ring: int = 1
    tensor: int = 1
    cfg: int = 1

    def __post_init__(self) -> None:
        for name in ("ulysses", "ring", "tensor", "cfg"):
            _check_int("ParallelConfig", name, getattr(self, name), 1)
        if self.cfg not in (1, 2):
            _fail("ParallelConfig", "cfg", self.cfg, "1, 2")

    @property
    def world_size(self) -> int:
        return self.ulysses * self.ring * self.tensor * self.cfg

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


QUANT_SCHEMES = ("fp8", "int8")
QUANT_GRANULARITIES = ("tensor", "row")
DEFAULT_QUANT_EXCLUDE = ("*embed*", "*norm*", "proj_out", "*time_text_embed*", "*context_embedder*", "*x_embedder*")


@dataclass(frozen=True)
class QuantConfig:
    """Which linears of the transformer run quantized, and how."""

    scheme: str = "fp8"
    granularity: str = "row"
    weight_only: bool = False
    exclude: tuple[str, ...] = DEFAULT_QUANT_EXCLUDE

    def __post_init__(self) -> None:
        _check_choice("QuantConfig", "scheme", self.scheme, QUANT_SCHEMES)
        _check_choice("QuantConfig", "granularity", self.granularity, QUANT_GRANULARITIES)
        _check_choice("QuantConfig", "weight_only", self.weight_only, (False, True))
        if self.weight_only and self.scheme != "int8":
            _fail("QuantConfig", "weight_only", self.weight_only, "True only with scheme='int8'")
        if isinstance(self.exclude, str) or not all(isinstance(p, str) for p in self.exclude):
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

    def __post_init__(self) -> None:
        _check_choice("CompileConfig", "mode", self.mode, COMPILE_MODES)
        _check_choice("CompileConfig", "fullgraph", self.fullgraph, (False, True))
        _check_choice("CompileConfig", "dynamic", self.dynamic, (None, False, True))
        if self.backend is not None and not isinstance(self.backend, str):
            _fail("CompileConfig", "backend", self.backend, "None or a torch.compile backend name")
        if not isinstance(self.options, dict):
            _fail("CompileConfig", "options", self.options, "a dict of inductor options")
        if self.mode is not None and self.options:
            _fail("CompileConfig", "options", self.options, "empty when mode is set (torch.compile takes one of them)")

    def __hash__(self) -> int:
        return hash((self.mode, self.fullgraph, self.dynamic, self.backend, tuple(sorted(self.options.items()))))


@dataclass(frozen=True)
class CompileTarget:
    """What `cachedit_compile_options` is asked about: the module kind and the user's config."""

    kind: str  # "transformer_block"
    family: str
    config: CompileConfig


def coerce(value: Any, cls: type, field_name: str):
    """Accept None, an instance, a dict of fields, or True (defaults) for `field_name`."""
    if value is None or value is False:
        return None
    if isinstance(value, cls):
        return value
    if value is True:
        return cls()
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{field_name}: unknown field(s) {unknown}; allowed fields: {sorted(known)}")
        return cls(**value)
    raise ValueError(f"{field_name}={value!r} is invalid; allowed values: None, True, a dict of "
                     f"{cls.__name__} fields, or a cachedit.{cls.__name__}")
