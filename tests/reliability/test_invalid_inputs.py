"""Invalid inputs to `accelerate`: each raises the stated exception naming the field, before anything is
modified. One tiny pipeline is shared by the module; after every refusal its outputs (a 2-step call),
module tree, every instance `__dict__`'s keys and its classes' `__call__` / `forward` are unchanged."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import cachedit
from cachedit.config import CacheConfig, CompileConfig, ParallelConfig, QuantConfig
from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

NAN, INF = math.nan, math.inf
MAG = {"policy": "magcache", "Fn": 1}


def _mutated(config, **fields):
    """A frozen config changed behind its back (object.__setattr__), as a careless caller might."""
    for name, value in fields.items():
        object.__setattr__(config, name, value)
    return config


# (id, accelerate keyword arguments (or a callable making them), exception type, regex the message must match)
CASES = [
    # -- cache: every field -----------------------------------------------------------------------------------------
    ("Fn negative", dict(cache={"Fn": -1}), ValueError, r"CacheConfig\.Fn=-1 is invalid; allowed values: an integer"),
    ("Fn float", dict(cache={"Fn": 1.5}), ValueError, r"CacheConfig\.Fn=1\.5"),
    ("Bn string", dict(cache={"Bn": "1"}), ValueError, r"CacheConfig\.Bn='1'"),
    ("Fn zero for dbcache", dict(cache={"Fn": 0}), ValueError, r"CacheConfig\.Fn=0 is invalid for policy 'dbcache'"),
    ("threshold nan", dict(cache={"residual_diff_threshold": NAN}), ValueError,
     r"CacheConfig\.residual_diff_threshold=nan is invalid; allowed values: a finite number >= 0"),
    ("threshold inf", dict(cache={"residual_diff_threshold": INF}), ValueError, r"residual_diff_threshold=inf"),
    ("threshold negative", dict(cache={"residual_diff_threshold": -0.1}), ValueError, r"residual_diff_threshold=-0\.1"),
    ("threshold bool", dict(cache={"residual_diff_threshold": True}), ValueError, r"residual_diff_threshold=True"),
    ("max_accumulated_diff nan", dict(cache={"max_accumulated_diff": NAN}), ValueError,
     r"CacheConfig\.max_accumulated_diff=nan is invalid; allowed values: a finite number > 0"),
    ("max_accumulated_diff inf", dict(cache={"max_accumulated_diff": INF}), ValueError, r"max_accumulated_diff=inf"),
    ("max_accumulated_diff zero", dict(cache={"max_accumulated_diff": 0}), ValueError,
     r"max_accumulated_diff=0 is invalid; allowed values: a finite number > 0"),
    ("warmup_steps negative", dict(cache={"warmup_steps": -1}), ValueError, r"CacheConfig\.warmup_steps=-1"),
    ("warmup_interval zero", dict(cache={"warmup_interval": 0}), ValueError, r"CacheConfig\.warmup_interval=0"),
    ("max_cached_steps -2", dict(cache={"max_cached_steps": -2}), ValueError, r"CacheConfig\.max_cached_steps=-2"),
    ("max_continuous float", dict(cache={"max_continuous_cached_steps": 1.0}), ValueError,
     r"CacheConfig\.max_continuous_cached_steps=1\.0"),
    ("mode unknown", dict(cache={"mode": "prune"}), ValueError, r"CacheConfig\.mode='prune' .*'dbcache', 'dbprune'"),
    ("protected_blocks None", dict(cache={"protected_blocks": None}), ValueError,
     r"CacheConfig\.protected_blocks=None is invalid; allowed values: a tuple of block indices"),
    ("protected_blocks negative", dict(cache={"protected_blocks": (-1,)}), ValueError, r"protected_blocks=\(-1,\)"),
    ("protected_blocks string", dict(cache={"protected_blocks": "12"}), ValueError, r"protected_blocks='12'"),
    ("protected_blocks beyond the model", dict(cache={"mode": "dbprune", "protected_blocks": (9,)}), ValueError,
     r"CacheConfig\.protected_blocks=\(9,\) names blocks \[9\] but the model has 4"),
    ("all middle blocks protected", dict(cache={"mode": "dbprune", "protected_blocks": (1, 2, 3)}), ValueError,
     r"protected_blocks=\(1, 2, 3\) leave no block .* could never cache"),
    ("calibrator unknown", dict(cache={"calibrator": "psychic"}), ValueError, r"CacheConfig\.calibrator='psychic'"),
    ("calibrator with dbprune", dict(cache={"calibrator": "taylorseer", "mode": "dbprune"}), ValueError,
     r"CacheConfig\.calibrator='taylorseer' .*None when mode='dbprune'"),
    ("taylorseer_order zero", dict(cache={"taylorseer_order": 0}), ValueError, r"CacheConfig\.taylorseer_order=0"),
    ("steps_mask int", dict(cache={"steps_mask": 5}), ValueError,
     r"CacheConfig\.steps_mask=5 is invalid; allowed values: None, one of"),
    ("steps_mask dict", dict(cache={"steps_mask": {0: 1, 1: 0}}), ValueError, r"CacheConfig\.steps_mask=\{0: 1"),
    ("steps_mask not 0/1", dict(cache={"steps_mask": [0, 2]}), ValueError, r"CacheConfig\.steps_mask=\[0, 2\]"),
    ("steps_mask empty", dict(cache={"steps_mask": []}), ValueError, r"CacheConfig\.steps_mask=\[\]"),
    ("steps_mask bools", dict(cache={"steps_mask": [True, False]}), ValueError, r"CacheConfig\.steps_mask=\[True"),
    ("steps_mask policy", dict(cache={"steps_mask": "warp"}), ValueError, r"CacheConfig\.steps_mask='warp'"),
    ("mask_mode unknown", dict(cache={"mask_mode": "sometimes"}), ValueError, r"CacheConfig\.mask_mode='sometimes'"),
    ("policy unknown", dict(cache={"policy": "psychic"}), ValueError, r"CacheConfig\.policy='psychic'"),
    ("policy_options list", dict(cache={"policy_options": [1]}), ValueError, r"CacheConfig\.policy_options=\[1\]"),
    ("dbcache takes no options", dict(cache={"policy_options": {"x": 1}}), ValueError,
     r"CacheConfig\.policy_options: policy 'dbcache' takes no options"),
    ("magcache without ratios", dict(cache=MAG), ValueError, r"policy_options\['mag_ratios'\] is required"),
    ("magcache empty ratios", dict(cache={**MAG, "policy_options": {"mag_ratios": []}}), ValueError,
     r"CacheConfig\.policy_options\['mag_ratios'\]=\[\] is invalid for policy 'magcache'; allowed values: a non-empty"),
    ("magcache string ratio", dict(cache={**MAG, "policy_options": {"mag_ratios": ["a"]}}), ValueError,
     r"policy_options\['mag_ratios'\]=\['a'\]"),
    ("magcache nan ratio", dict(cache={**MAG, "policy_options": {"mag_ratios": [1.0, NAN]}}), ValueError,
     r"policy_options\['mag_ratios'\]=\[1\.0, nan\]"),
    ("magcache max_skip_steps", dict(cache={**MAG, "policy_options": {"mag_ratios": [1.0], "max_skip_steps": 0}}),
     ValueError, r"policy_options\['max_skip_steps'\]=0 .*an integer >= 1"),
    ("magcache retention_ratio", dict(cache={**MAG, "policy_options": {"mag_ratios": [1.0], "retention_ratio": 2}}),
     ValueError, r"policy_options\['retention_ratio'\]=2 .*a finite number in \[0\.0, 1\.0\]"),
    ("magcache unknown option", dict(cache={**MAG, "policy_options": {"mag_ratio": [1.0]}}), ValueError,
     r"CacheConfig\.policy_options=\{'mag_ratio'.* do not fit policy 'magcache'"),
    ("teacache empty coefficients", dict(cache={"policy": "teacache", "policy_options": {"coefficients": []}}),
     ValueError, r"policy_options\['coefficients'\]=\[\] is invalid for policy 'teacache'"),
    ("teacache string coefficient", dict(cache={"policy": "teacache", "policy_options": {"coefficients": ["x"]}}),
     ValueError, r"policy_options\['coefficients'\]=\['x'\]"),
    ("teacache inf coefficient", dict(cache={"policy": "teacache", "policy_options": {"coefficients": [1, INF]}}),
     ValueError, r"policy_options\['coefficients'\]=\[1, inf\]"),
    ("forecast order -3", dict(cache={"policy": "forecast", "policy_options": {"order": -3}}), ValueError,
     r"policy_options\['order'\]=-3 is invalid for policy 'forecast'; allowed values: an integer >= 1"),
    ("forecast late_weight nan", dict(cache={"policy": "forecast", "policy_options": {"late_weight": NAN}}),
     ValueError, r"policy_options\['late_weight'\]=nan"),
    ("forecast late_weight negative", dict(cache={"policy": "forecast", "policy_options": {"late_weight": -1}}),
     ValueError, r"policy_options\['late_weight'\]=-1"),
    ("easycache takes no options", dict(cache={"policy": "easycache", "policy_options": {"rate": 1}}), ValueError,
     r"CacheConfig\.policy_options: policy 'easycache' takes no options"),
    ("Fn + Bn exceeds the blocks", dict(cache={"Fn": 4, "Bn": 1}), ValueError,
     r"CacheConfig\.Fn \+ CacheConfig\.Bn = 5 exceeds the model's 4"),
    ("Fn + Bn leaves nothing to skip", dict(cache={"Fn": 3, "Bn": 1}), ValueError,
     r"CacheConfig\.Fn=3, Bn=1 leave no block of pipe\.transformer .* could never cache; allowed: Fn \+ Bn < 4"),
    ("cache unknown field", dict(cache={"Fnn": 1}), ValueError, r"cache: unknown field\(s\) \['Fnn'\]"),
    ("cache preset unknown", dict(cache="turbo"), ValueError, r"cache='turbo' is not a preset"),
    ("cache of a wrong type", dict(cache=3), ValueError, r"cache=3 is invalid; allowed values: None, True"),
    ("cache mutated: Fn", lambda: dict(cache=_mutated(CacheConfig(), Fn=-1)), ValueError, r"CacheConfig\.Fn=-1"),
    ("cache mutated: threshold nan", lambda: dict(cache=_mutated(CacheConfig(), residual_diff_threshold=NAN)),
     ValueError, r"CacheConfig\.residual_diff_threshold=nan"),
    ("cache mutated: policy options",
     lambda: dict(cache=_mutated(CacheConfig(policy="forecast"), policy_options={"order": -3})), ValueError,
     r"policy_options\['order'\]=-3"),
    # -- parallel ---------------------------------------------------------------------------------------------------
    ("ulysses zero", dict(parallel={"ulysses": 0}), ValueError, r"ParallelConfig\.ulysses=0"),
    ("cfg three", dict(parallel={"cfg": 3}), ValueError, r"ParallelConfig\.cfg=3 is invalid; allowed values: 1, 2"),
    ("fp8_comm without ulysses", dict(parallel={"fp8_comm": True}), ValueError, r"ParallelConfig\.fp8_comm=True"),
    ("vae not a bool", dict(parallel={"vae": 1, "ulysses": 2}), ValueError, r"ParallelConfig\.vae=1"),
    ("ulysses without processes", dict(parallel={"ulysses": 2}), ValueError,
     r"parallel: ulysses=2 .*needs torch\.distributed initialised with world size 2"),
    ("cfg without processes", dict(parallel={"cfg": 2}), ValueError, r"parallel: cfg=2 needs torch\.distributed initialised with world size 2"),
    ("tensor with quantize", dict(parallel={"tensor": 2}, quantize=True), ValueError,
     r"ParallelConfig\.tensor=2 with quantize= is not supported"),
    ("parallel mutated", lambda: dict(parallel=_mutated(ParallelConfig(), ring=0)), ValueError,
     r"ParallelConfig\.ring=0"),
    # -- quantize ---------------------------------------------------------------------------------------------------
    ("scheme unknown", dict(quantize={"scheme": "fp4"}), ValueError, r"QuantConfig\.scheme='fp4'"),
    ("granularity unknown", dict(quantize={"granularity": "block"}), ValueError, r"QuantConfig\.granularity='block'"),
    ("weight_only with fp8", dict(quantize={"weight_only": True}), ValueError,
     r"QuantConfig\.weight_only=True .*only with scheme='int8'"),
    ("exclude None", dict(quantize={"exclude": None}), ValueError, r"QuantConfig\.exclude=None"),
    ("exclude string", dict(quantize={"exclude": "*embed*"}), ValueError, r"QuantConfig\.exclude='\*embed\*'"),
    ("keep_original int", dict(quantize={"keep_original": 1}), ValueError, r"QuantConfig\.keep_original=1"),
    ("exclude everything", dict(quantize={"exclude": ["*"]}), ValueError,
     r"quantize\.exclude=\('\*',\) leaves no nn\.Linear of pipe\.transformer"),
    ("quantize mutated", lambda: dict(quantize=_mutated(QuantConfig(), scheme="int4")), ValueError,
     r"QuantConfig\.scheme='int4'"),
    # -- compile ----------------------------------------------------------------------------------------------------
    ("compile mode unknown", dict(compile={"mode": "fastest"}), ValueError, r"CompileConfig\.mode='fastest'"),
    ("compile backend unknown", dict(compile={"backend": "nope"}), ValueError,
     r"CompileConfig\.backend: torch\.compile refuses .*Invalid backend: 'nope'"),
    ("compile backend empty", dict(compile={"backend": ""}), ValueError, r"CompileConfig\.backend=''"),
    ("compile backend int", dict(compile={"backend": 3}), ValueError, r"CompileConfig\.backend=3"),
    ("inductor option unknown", dict(compile={"options": {"bogus_option": 1}}), ValueError,
     r"CompileConfig\.options: torch\.compile refuses .*Unexpected optimization option bogus_option"),
    ("inductor option type", dict(compile={"options": {"conv_1x1_as_mm": "yes"}}), ValueError,
     r"CompileConfig\.options: .*conv_1x1_as_mm"),
    ("options with mode", dict(compile={"mode": "max-autotune", "options": {"x": 1}}), ValueError,
     r"CompileConfig\.options=\{'x': 1\} .*empty when mode is set"),
    ("options not a dict", dict(compile={"options": [1]}), ValueError, r"CompileConfig\.options=\[1\]"),
    ("fullgraph string", dict(compile={"fullgraph": "yes"}), ValueError, r"CompileConfig\.fullgraph='yes'"),
    ("dynamic int", dict(compile={"dynamic": 1}), ValueError, r"CompileConfig\.dynamic=1"),
    ("fuse_qkv string", dict(compile={"fuse_qkv": "auto"}), ValueError, r"CompileConfig\.fuse_qkv='auto'"),
    ("compile mutated", lambda: dict(compile=_mutated(CompileConfig(), backend="nope")), ValueError,
     r"CompileConfig\.backend"),
    # -- device and attention ---------------------------------------------------------------------------------------
    ("device unknown", dict(device="tpu"), ValueError, r"device='tpu' is not an installed backend; allowed values"),
    ("device not a string", dict(device=3), ValueError, r"device must be a backend name or 'auto', got 3"),
    ("device unavailable", dict(device="ascend"), ValueError, r"device='ascend' is installed but unavailable"),
    ("attention not a string", dict(attention=3), ValueError, r"attention=3 is invalid"),
    ("attention unknown", dict(attention="nope"), ValueError, r"attention='nope' is not a kernel of this backend"),
]
assert len(CASES) >= 50


def _classes(pipe):
    modules = [m for c in pipe.components.values() if isinstance(c, torch.nn.Module) for m in c.modules()]
    return {type(pipe), *map(type, modules)}


def _snapshot(pipe) -> dict:
    """Everything an early refusal must leave alone."""
    tree = {name: [(n, type(m).__name__, sorted(vars(m))) for n, m in c.named_modules()]
            for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    return {"tree": tree, "pipe_dict": sorted(vars(pipe)),
            "class_methods": {cls: (cls.__dict__.get("__call__"), cls.__dict__.get("forward")) for cls in _classes(pipe)}}


def _run(pipe) -> torch.Tensor:
    return pipe("a cat", **tiny_call_kwargs("flux", num_inference_steps=2)).images


@pytest.fixture(scope="module")
def shared():
    """One tiny pipeline for the module, with its output and snapshot taken before any refusal."""
    pipe = tiny_pipeline("flux")
    return pipe, _run(pipe), _snapshot(pipe)


@pytest.mark.parametrize("kwargs,error,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_input_is_refused_and_changes_nothing(shared, kwargs, error, match):
    pipe, before, snap = shared
    kwargs = kwargs() if callable(kwargs) else kwargs
    with pytest.raises(error, match=match):
        cachedit.accelerate(pipe, **{"device": "cpu_ref", **kwargs})
    assert _snapshot(pipe) == snap
    assert not cachedit.is_accelerated(pipe)
    assert torch.equal(_run(pipe), before)  # same code path, same inputs: bitwise by construction


def test_pipeline_with_diffusers_own_cache_is_refused():
    from diffusers import FirstBlockCacheConfig

    pipe = tiny_pipeline("flux")
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    before, snap = _run(pipe), _snapshot(pipe)
    with pytest.raises(ValueError, match=r"pipe\.transformer already runs diffusers' own cache "
                                         r"\(FirstBlockCacheConfig\).*disable_cache\(\) first"):
        cachedit.accelerate(pipe, device="cpu_ref", cache="fast")
    assert _snapshot(pipe) == snap and torch.equal(_run(pipe), before)


def test_summary_returns_copies(shared):
    pipe, before, _ = shared
    cachedit.accelerate(pipe, device="cpu_ref", cache=dict(policy="forecast", policy_options={"order": 2}))
    try:
        report = cachedit.summary(pipe)
        report["cache"]["config"]["policy_options"]["order"] = -3
        report["cache"]["config"]["Fn"] = 99
        config = pipe._cachedit_state.cache
        assert config.policy_options == {"order": 2} and config.Fn == 1
        assert cachedit.summary(pipe)["cache"]["config"]["policy_options"] == {"order": 2}
    finally:
        cachedit.disable(pipe)
    assert torch.equal(_run(pipe), before)


def test_configs_do_not_share_the_callers_dicts():
    options = {"order": 2}
    config = CacheConfig(policy="forecast", policy_options=options)
    options["order"] = -3
    assert config.policy_options == {"order": 2}
    assert dataclasses.replace(config).policy_options == {"order": 2}
