"""What the benchmarks compare: cachedit configurations and the peers' own caches, by name and settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Method:
    """One way to speed a pipeline up: `apply(pipe)` on a freshly loaded pipeline, `remove(pipe)` after.

    `role` marks rows the headline reads: "overhead" (a cache that never skips: its time against the plain
    pipeline is pure overhead) and "parity" (settings that cache-dit runs identically, compared pairwise)."""

    family: str  # "uncached", "cachedit", "cache-dit", "diffusers"
    name: str
    apply: Callable = field(repr=False)
    remove: Callable = field(repr=False)
    settings: dict = field(default_factory=dict)
    role: str = ""
    deterministic: bool = False  # the same output at every call (checked while timing)


UNCACHED = Method("uncached", "uncached", lambda p: None, lambda p: None, deterministic=True)


def cachedit_method(name: str, device: str = "auto", role: str = "", **cache) -> Method:
    import cachedit

    return Method("cachedit", name, lambda p: cachedit.accelerate(p, device=device, cache=cache), cachedit.disable,
                  cache, role, deterministic=True)


def _own_class(pipe) -> None:
    """cache-dit 1.5.3 replaces `__call__` on the pipeline's class, which would reach every pipeline of
    that class in the process, the plain baseline included: give this instance a class of its own."""
    cls = type(pipe)
    pipe.__class__ = type(cls.__name__, (cls,), {"__module__": cls.__module__})


def cache_dit_method(name: str, taylorseer: bool = False, role: str = "", **cfg) -> Method | None:
    try:
        import cache_dit
    except ImportError:
        return None

    def apply(pipe):
        _own_class(pipe)
        calib = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
        cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(**cfg), calibrator_config=calib)

    return Method("cache-dit", name, apply, cache_dit.disable_cache, {**cfg, "taylorseer": taylorseer}, role)


def diffusers_can_cache(pipe) -> bool:
    """diffusers' caches are enabled through its `CacheMixin.enable_cache`, which only some transformer classes
    have (diffusers 0.42.1: not `SD3Transformer2DModel`); the bench leaves their rows out elsewhere."""
    return hasattr(pipe.transformer, "enable_cache")


def diffusers_method(name: str, config_factory: Callable, **settings) -> Method:
    return Method("diffusers", name, lambda p: p.transformer.enable_cache(config_factory()),
                  lambda p: p.transformer.disable_cache(), settings)


def dbcache_pair(threshold: float, taylorseer: bool, role: str = "") -> list[Method]:
    """cachedit's DBCache and cache-dit's at the same settings: F1B0, 4 warmup steps, at most 3 cached in a row."""
    suffix = f"F1B0 t={threshold}" + (" +TaylorSeer" if taylorseer else "")
    ours = cachedit_method(f"DBCache {suffix}", role=role, Fn=1, Bn=0, residual_diff_threshold=threshold,
                           warmup_steps=4, max_continuous_cached_steps=3,
                           calibrator="taylorseer" if taylorseer else None)
    theirs = cache_dit_method(f"cache-dit DBCache {suffix}", taylorseer=taylorseer, role=role, Fn_compute_blocks=1,
                              Bn_compute_blocks=0, residual_diff_threshold=threshold, max_warmup_steps=4,
                              max_continuous_cached_steps=3)
    return [m for m in (ours, theirs) if m is not None]


def overhead_methods() -> list[Method]:
    """Caches that never skip: what they cost over the plain pipeline is overhead alone."""
    return [cachedit_method("never skips: threshold 0", role="overhead", Fn=1, Bn=0, residual_diff_threshold=0,
                            warmup_steps=0),
            cachedit_method("never skips: threshold 1e-9 +TaylorSeer", role="overhead", Fn=1, Bn=0,
                            residual_diff_threshold=1e-9, warmup_steps=0, calibrator="taylorseer")]


def peer_overhead_methods() -> list[Method]:
    """The peers' caches at settings that never skip: their overhead next to cachedit's, on the same run.
    cache-dit's row is named after cachedit's own threshold-0 row, so the headline pairs them."""
    from diffusers import FirstBlockCacheConfig

    never = cache_dit_method("cache-dit never skips: threshold 0", role="peer overhead", Fn_compute_blocks=1,
                             Bn_compute_blocks=0, residual_diff_threshold=0, max_warmup_steps=0)
    fbc = diffusers_method("diffusers FirstBlockCache never skips: threshold 0",
                           lambda: FirstBlockCacheConfig(threshold=0.0), threshold=0.0)
    fbc.role = "peer overhead"
    return [m for m in (never, fbc) if m is not None]


def default_methods(steps: int, mag_ratios=None, calibrated: dict | None = None,
                    diffusers_caches: bool = True) -> list[Method]:
    """Every method and setting the frontier is drawn from. `calibrated`: cachedit's own TeaCache
    polynomial and MagCache ratios for this model ({"teacache": {...}, "magcache": {...}}).
    `diffusers_caches=False` leaves diffusers' own caches out (see `diffusers_can_cache`)."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    methods = [UNCACHED, *overhead_methods()]
    for t in (0.05, 0.1, 0.2, 0.3):
        for taylorseer in (False, True):
            methods += dbcache_pair(t, taylorseer)
        methods.append(cachedit_method(f"DBCache F1B0 t={t} +FoCa", Fn=1, Bn=0, residual_diff_threshold=t,
                                       warmup_steps=4, max_continuous_cached_steps=3, calibrator="foca"))
    calibrated = calibrated or {}
    for t in (0.3, 0.6, 1.0, 2.0):
        if "teacache" in calibrated:
            methods.append(cachedit_method(f"TeaCache t={t} +TaylorSeer", Fn=0, residual_diff_threshold=t,
                                           warmup_steps=0, policy="teacache", policy_options=calibrated["teacache"],
                                           calibrator="taylorseer"))
    for t in (0.1, 0.2, 0.4, 0.8):
        if "magcache" in calibrated:
            methods.append(cachedit_method(f"MagCache t={t}", Fn=0, residual_diff_threshold=t, warmup_steps=0,
                                           policy="magcache",
                                           policy_options={**calibrated["magcache"], "max_skip_steps": 5}))
    for t in (0.2, 0.4, 0.8, 1.5):
        methods.append(cachedit_method(f"EasyCache t={t} +TaylorSeer", Fn=0, residual_diff_threshold=t,
                                       warmup_steps=0, policy="easycache", calibrator="taylorseer"))
    for t in (0.1, 0.2, 0.4, 0.8):
        methods.append(cachedit_method(f"Forecast t={t} +FoCa", Fn=1, Bn=0, residual_diff_threshold=t,
                                       warmup_steps=2, policy="forecast", calibrator="foca"))
    for n in (2, 3, 4, 5):  # the fixed-interval full-stack forecast (issue 15), with the new calibrators
        for label, calibrator, order in (("FoCa", "foca", 1), ("TimedTaylor o2", "taylor_t", 2),
                                         ("HiCache o2", "hicache", 2), ("FreqCa", "freqca", 1)):
            methods.append(cachedit_method(f"interval N={n} F0B0 +{label}", Fn=0, Bn=0, residual_diff_threshold=1.0,
                                           warmup_steps=2, policy="interval", policy_options={"interval": n},
                                           calibrator=calibrator, taylorseer_order=order))
    for policy in ("medium", "fast", "ultra"):
        methods.append(cachedit_method(f"step mask {policy} +TaylorSeer", Fn=1, Bn=0, residual_diff_threshold=0,
                                       warmup_steps=0, steps_mask=policy, mask_mode="static",
                                       calibrator="taylorseer"))
    if not diffusers_caches:
        return methods
    for t in (0.05, 0.1, 0.2, 0.3):
        methods.append(diffusers_method(f"diffusers FirstBlockCache t={t}",
                                        lambda t=t: FirstBlockCacheConfig(threshold=t), threshold=t))
    for interval in (2, 3, 4):
        for lite in (True, False):
            methods.append(diffusers_method(
                f"diffusers TaylorSeerCache interval={interval}" + (" lite" if lite else ""),
                lambda i=interval, lite=lite: TaylorSeerCacheConfig(
                    cache_interval=i, disable_cache_before_step=3, taylor_factors_dtype=torch.float32,
                    use_lite_mode=lite),
                cache_interval=interval, lite=lite))
    if mag_ratios is not None:
        for t in (0.02, 0.06, 0.12, 0.24):
            methods.append(diffusers_method(f"diffusers MagCache t={t}", lambda t=t: MagCacheConfig(
                threshold=t, num_inference_steps=steps, mag_ratios=mag_ratios), threshold=t))
    return methods


def calibrate_mag_ratios(load: Callable, call: Callable, prompt: str, steps: int) -> list[float] | None:
    """MagCache needs per-model magnitude ratios: one calibration run with diffusers' own hook,
    whose result diffusers only logs, so it is read from that log record."""
    import ast
    import logging

    from diffusers import MagCacheConfig

    found: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: found.append(record.getMessage())
    logger = logging.getLogger("diffusers.hooks.mag_cache")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        pipe = load()
        if not diffusers_can_cache(pipe):
            return None
        pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
        pipe(prompt=prompt, **call(steps, 0))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    for message in found:
        if "Calibration Results:" in message:
            return [float(r) for r in ast.literal_eval(message.split("Calibration Results:", 1)[1].strip())]
    return None


def model_and_call(model: str, cfg: bool = True):
    """(load, call(steps, seed), default prompts) for a model name or a pipeline folder: 'reference' (the shipped
    trained FLUX model), 'reference-sd3' (the shipped trained SD3 model, CFG batched in one call), 'flux9' (the
    FLUX reference pipeline around a random 3 + 6 block, hidden 128 FLUX transformer: for overhead, nothing caches on
    random weights), 'tiny' (the random tiny FLUX pipeline).
    `cfg=False` turns the reference models' classifier-free guidance off (one transformer call per step on the
    prompt batch alone)."""
    from ..generate import call_kwargs, load_pipeline

    if model == "flux9":  # overhead only: the reference pipeline around a random 9-block transformer
        from ..testing.reference import reference_pipeline

        def load_flux9():
            pipe = reference_pipeline()
            config = {**pipe.transformer.config, "num_layers": 3, "num_single_layers": 6}
            with torch.random.fork_rng():
                torch.manual_seed(0)
                pipe.transformer = type(pipe.transformer).from_config(config).eval()
            return pipe

        return load_flux9, model_and_call("reference", cfg)[1], [f"a handwritten digit {d}" for d in range(10)]
    if model == "tiny":
        from ..testing.tiny import tiny_call_kwargs, tiny_pipeline

        def call(steps, seed):
            kwargs = tiny_call_kwargs("flux", num_inference_steps=steps, seed=seed)
            kwargs.pop("negative_prompt"), kwargs.pop("true_cfg_scale")
            return kwargs

        return lambda: tiny_pipeline("flux"), call, ["a photo of a cat", "a red monkey"]
    reference = model in ("reference", "reference-sd3")
    prompts = [f"a handwritten digit {d}" for d in range(10)] if reference else ["a photo of a cat"]

    def call(steps, seed):
        kwargs = call_kwargs(model, steps, seed)
        if not cfg:
            kwargs.pop("negative_prompt", None), kwargs.pop("true_cfg_scale", None)
            if model == "reference-sd3":
                kwargs["guidance_scale"] = 1.0  # SD3: CFG is guidance_scale > 1
        return kwargs

    return (lambda: load_pipeline(model)), call, prompts
