"""accelerate / disable / summary on real (tiny) diffusers pipelines."""

from __future__ import annotations

import pytest
import torch

import cachedit
from cachedit.quant.linear import weight_bytes
from cachedit.testing.tiny import TINY_FAMILIES, tiny_call_kwargs, tiny_pipeline

PROMPT = "a photo of a cat"
# Routed attention (cpu_ref math kernel, float32 accumulation) against torch SDPA, end to end.
ROUTED_ATOL = 1e-4


def _images(out):
    return out.images if hasattr(out, "images") else out.frames


def _run(pipe, family):
    return _images(pipe(prompt=PROMPT, **tiny_call_kwargs(family)))


def _snapshot(pipe):
    """Everything accelerate could touch: each module's attributes and forward, and the weights."""
    modules = {}
    for comp_name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            for name, m in comp.named_modules():
                modules[(comp_name, name)] = (type(m), dict(m.__dict__), m.forward.__func__ if hasattr(m.forward, "__func__") else m.forward)
    weights = {(n, k): v.clone() for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)
               for k, v in c.state_dict().items()}
    return type(pipe), dict(pipe.__dict__), modules, weights


def _assert_unchanged(pipe, snap):
    cls, attrs, modules, weights = snap
    assert type(pipe) is cls and pipe.__dict__.keys() == attrs.keys()
    now = _snapshot(pipe)[2]
    assert now.keys() == modules.keys()
    for key, (mcls, mattrs, fwd) in modules.items():
        ncls, nattrs, nfwd = now[key]
        assert ncls is mcls and nattrs.keys() == mattrs.keys() and nfwd is fwd, key
    for n, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            for k, v in comp.state_dict().items():
                assert torch.equal(v, weights[(n, k)]), (n, k)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_default_path_is_the_plain_pipeline_and_a_named_kernel_is_routed(family):
    pipe = tiny_pipeline(family)
    before = _run(pipe, family)
    snap = _snapshot(pipe)  # after a call: pipelines keep per-call attributes of their own
    # Nothing to skip or split: the default path leaves the model's own SDPA calls alone (same code path).
    assert cachedit.accelerate(pipe, device="cpu_ref") is pipe
    assert torch.equal(_run(pipe, family), before)
    info = cachedit.summary(pipe)
    assert info["backend"] == "cpu_ref" and info["attention"]["eager_calls"] == {}
    assert info["attention"]["kernels"] == {name: ["torch_sdpa"] for name in info["families"]}
    cachedit.disable(pipe)
    _assert_unchanged(pipe, snap)

    cachedit.accelerate(pipe, device="cpu_ref", attention="math")
    during = _run(pipe, family)
    for name, calls in cachedit.summary(pipe)["attention"]["eager_calls"].items():
        assert calls.get("math", 0) > 0, f"{family}.{name}: attention did not reach the cpu_ref kernel"
    assert (during - before).abs().max().item() <= ROUTED_ATOL
    cachedit.disable(pipe)
    assert cachedit.summary(pipe) == {"accelerated": False}
    assert torch.equal(_run(pipe, family), before)
    _assert_unchanged(pipe, snap)


def test_second_instance_is_unaffected():
    a, b = tiny_pipeline("flux"), tiny_pipeline("flux")
    b_before = _run(b, "flux")
    class_forward = type(b.transformer).forward
    cachedit.accelerate(a, device="cpu_ref", attention="torch_sdpa")
    _run(a, "flux")
    assert type(b.transformer).forward is class_forward and "forward" not in b.transformer.__dict__
    registry = getattr(b.transformer, "_diffusers_hook", None)  # diffusers' own cache_context may create one
    assert registry is None or not any(name.startswith("cachedit") for name in registry.hooks)
    assert torch.equal(_run(b, "flux"), b_before)
    assert cachedit.summary(b) == {"accelerated": False}
    # And a is really accelerated, with the kernel it asked for.
    assert cachedit.summary(a)["attention"]["kernels"] == {"transformer": ["torch_sdpa"]}
    assert torch.equal(_run(a, "flux"), b_before)  # torch_sdpa is the very op diffusers calls


BAD_INPUTS = [
    (dict(device="nope"), "device='nope' is not an installed backend; allowed values: 'auto', .*'cpu_ref'"),
    (dict(device=3), "device must be a backend name"),
    (dict(device="ascend"), "device='ascend' is installed but unavailable: torch_npu"),
    (dict(cache={"Fn": -1}), r"CacheConfig.Fn=-1 is invalid; allowed values: an integer >= 0"),
    (dict(cache={"Fn": 0}), r"CacheConfig.Fn=0 is invalid for policy 'dbcache' .*; allowed values: an integer >= 1"),
    (dict(cache={"policy": "magcache"}), r"policy_options\['mag_ratios'\] is required for policy 'magcache'"),
    (dict(cache={"policy": "nope"}), r"CacheConfig.policy='nope' is invalid; allowed values: 'dbcache', 'teacache'"),
    (dict(cache={"Fn": 3, "Bn": 3}), r"Fn \+ CacheConfig.Bn = 6 exceeds the model's 4 transformer blocks"),
    (dict(cache={"threshold": 0.1}), r"cache: unknown field\(s\) \['threshold'\]; allowed fields"),
    (dict(cache="fastest"), "cache='fastest' is not a preset; allowed values: 'fbcache', 'fast'"),
    (dict(parallel={"ulysses": 0}), "ParallelConfig.ulysses=0 is invalid; allowed values: an integer >= 1"),
    (dict(parallel={"cfg": 3}), "ParallelConfig.cfg=3 is invalid; allowed values: 1, 2"),
    (dict(quantize={"scheme": "fp4"}), "QuantConfig.scheme='fp4' is invalid; allowed values: 'fp8', 'int8'"),
    (dict(quantize={"scheme": "fp8", "weight_only": True}), "QuantConfig.weight_only=True is invalid"),
    (dict(compile={"mode": "fast"}), "CompileConfig.mode='fast' is invalid; allowed values: None, 'default'"),
    (dict(compile={"fuse_qkv": "yes"}), "CompileConfig.fuse_qkv='yes' is invalid; allowed values: None, False, True"),
    (dict(parallel={"ulysses": 2, "vae": "yes"}), "ParallelConfig.vae='yes' is invalid; allowed values: False, True"),
    (dict(attention="flash3"), "attention='flash3' is not a kernel of this backend; allowed values: 'auto', "),
    (dict(attention=5), "attention=5 is invalid"),
]


@pytest.mark.parametrize("kwargs,message", BAD_INPUTS, ids=[next(iter(k)) + str(i) for i, (k, _) in enumerate(BAD_INPUTS)])
def test_bad_input_raises_before_anything_changes(kwargs, message):
    pipe = tiny_pipeline("flux")
    snap = _snapshot(pipe)
    kwargs = {"device": "cpu_ref", **kwargs}
    with pytest.raises(ValueError, match=message):
        cachedit.accelerate(pipe, **kwargs)
    _assert_unchanged(pipe, snap)


def test_already_accelerated_and_wrong_device_placement():
    pipe = tiny_pipeline("flux")
    cachedit.accelerate(pipe, device="cpu_ref")
    with pytest.raises(ValueError, match="already accelerated"):
        cachedit.accelerate(pipe, device="cpu_ref")
    cachedit.disable(pipe)
    cachedit.disable(pipe)  # idempotent


def test_kernel_lacking_a_capability_is_a_clear_error(fresh_plugins):
    half_only = cachedit.AttentionKernel(name="half_only", fn=lambda *a, **k: None,
                                         dtypes=frozenset({torch.bfloat16}), priority=1000)

    class HalfOnly:
        @cachedit.hookimpl
        def cachedit_attention_kernels(self, backend):
            return [half_only]

    fresh_plugins.register(HalfOnly(), "half_only_plugin")
    pipe = tiny_pipeline("flux")
    snap = _snapshot(pipe)
    with pytest.raises(ValueError, match=r"attention='half_only' cannot serve this model: dtype torch.float32 not in"):
        cachedit.accelerate(pipe, device="cpu_ref", attention="half_only")
    _assert_unchanged(pipe, snap)
    # "auto" falls back past it to the best kernel that fits, as declared: torch's own SDPA, so nothing is routed.
    cachedit.accelerate(pipe, device="cpu_ref")
    _run(pipe, "flux")
    assert cachedit.summary(pipe)["attention"]["kernels"] == {"transformer": ["torch_sdpa"]}


def test_compile_per_block_with_cpu_inductor():
    import torch._dynamo.utils as dynamo_utils

    pipe = tiny_pipeline("flux")
    before = _run(pipe, "flux")
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    weights = weight_bytes(pipe.transformer)
    cachedit.accelerate(pipe, device="cpu_ref", attention="math", compile=dict(fuse_qkv=True))
    during = _run(pipe, "flux")
    assert dict(dynamo_utils.counters["graph_break"]) == {}, "the attention router broke the block graphs"
    assert cachedit.summary(pipe)["attention"]["kernels"] == {"transformer": ["math"]}
    info = cachedit.summary(pipe)["compile"]
    assert info["blocks"] == 4 and info["backend"] == "inductor" and "fuse_qkv" not in info
    assert info["fused_qkv_modules"] == {"transformer": 4}  # 2 double-block + 2 single-block attentions
    assert weight_bytes(pipe.transformer) == weights  # the separate q/k/v weights are views of the fused ones
    assert (during - before).abs().max().item() <= ROUTED_ATOL
    blocks = list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks)
    assert all("cachedit.compile" in b._diffusers_hook.hooks for b in blocks)
    cachedit.disable(pipe)
    assert not any(hasattr(b, "_diffusers_hook") for b in blocks)
    assert not any(hasattr(b.attn, "to_qkv") or b.attn.fused_projections for b in blocks)
    assert torch.equal(_run(pipe, "flux"), before)


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_fused_qkv_with_quantization_quantizes_the_fused_linears(family):
    """Row-wise scales are per output channel, so quantizing to_qkv equals quantizing q, k and v apart."""
    pipe = tiny_pipeline(family)
    eager = dict(backend="eager")  # dynamo only: the fusion, not inductor, is under test
    cachedit.accelerate(pipe, device="cpu_ref", quantize=dict(scheme="int8", granularity="row"), compile=eager)
    separate = _run(pipe, family)
    assert cachedit.summary(pipe)["compile"]["fused_qkv_modules"] == {}  # cpu_ref's default: no fusion
    cachedit.disable(pipe)
    before = _run(pipe, family)
    cachedit.accelerate(pipe, device="cpu_ref", quantize=dict(scheme="int8", granularity="row"),
                        compile=dict(eager, fuse_qkv=True))
    fused = _run(pipe, family)
    attn = next(m for m in pipe.transformer.modules() if getattr(m, "fused_projections", False))
    assert type(attn.to_qkv).__name__ == "QuantizedLinear" and type(attn.to_q) is torch.nn.Linear
    assert cachedit.summary(pipe)["quantize"]["linears"]["transformer"] < sum(
        type(m) is torch.nn.Linear for m in tiny_pipeline(family).transformer.modules())
    assert (fused - separate).abs().max().item() <= 1e-5
    cachedit.disable(pipe)
    assert torch.equal(_run(pipe, family), before)
