"""LoRA adapters (peft, through diffusers' loader) with cachedit: loaded before or after `accelerate`, weighted,
fused, unfused and unloaded, each compared with the un-accelerated pipeline under the same LoRA operations.
A never-skipping cache runs the same ops on the same inputs, so those comparisons are bitwise."""

from __future__ import annotations

import pytest
import torch

import cachedit
from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

peft = pytest.importorskip("peft")

NEVER_SKIP = dict(Fn=1, Bn=0, residual_diff_threshold=0, warmup_steps=0)
SKIPS = dict(Fn=1, Bn=0, residual_diff_threshold=100.0, warmup_steps=2)  # random weights: caches every step allowed


def _run(pipe):
    return pipe(prompt="a photo of a cat", **tiny_call_kwargs("flux", num_inference_steps=5))[0]


def _both(reference, pipe, op):
    op(reference), op(pipe)
    return _run(reference), _run(pipe)


@pytest.mark.parametrize("when", ["before accelerate", "after accelerate"])
def test_lora_lifecycle_matches_the_plain_pipeline(lora_dir, when):
    reference, pipe = tiny_pipeline("flux"), tiny_pipeline("flux")
    reference.load_lora_weights(lora_dir, adapter_name="a")
    if when == "before accelerate":
        pipe.load_lora_weights(lora_dir, adapter_name="a")
    cachedit.accelerate(pipe, device="cpu_ref", cache=NEVER_SKIP)
    if when == "after accelerate":
        pipe.load_lora_weights(lora_dir, adapter_name="a")
    without = _run(tiny_pipeline("flux"))
    expected, got = _run(reference), _run(pipe)
    assert torch.equal(got, expected) and not torch.equal(got, without), "the LoRA must act, exactly as plain"
    for name, op in [("set_adapters 0.5", lambda p: p.set_adapters(["a"], [0.5])),
                     ("fuse_lora", lambda p: p.fuse_lora()), ("unfuse_lora", lambda p: p.unfuse_lora()),
                     ("unload_lora_weights", lambda p: p.unload_lora_weights())]:
        expected, got = _both(reference, pipe, op)
        assert torch.equal(got, expected), name
    cachedit.disable(pipe)
    assert torch.equal(_run(pipe), _run(reference))


def test_an_adapter_change_never_reuses_the_old_weights_residuals(lora_dir):
    """A skipping cache: after set_adapters the next call equals a fresh accelerated pipeline with that weight."""
    pipe = tiny_pipeline("flux")
    pipe.load_lora_weights(lora_dir, adapter_name="a")
    cachedit.accelerate(pipe, device="cpu_ref", cache=SKIPS)
    _run(pipe)
    pipe.set_adapters(["a"], [0.3])
    got = _run(pipe)
    fresh = tiny_pipeline("flux")
    fresh.load_lora_weights(lora_dir, adapter_name="a")
    fresh.set_adapters(["a"], [0.3])
    cachedit.accelerate(fresh, device="cpu_ref", cache=SKIPS)
    assert cachedit.summary(pipe)["cache"]["transformer"]["computed_fraction"] < 1.0
    assert torch.equal(got, _run(fresh))


def test_quantization_keeps_lora_layers_in_float(lora_dir):
    reference, pipe = tiny_pipeline("flux"), tiny_pipeline("flux")
    for p in (reference, pipe):
        p.load_lora_weights(lora_dir, adapter_name="a")
    cachedit.accelerate(pipe, device="cpu_ref", quantize=dict(scheme="int8"))
    info = cachedit.summary(pipe)["quantize"]
    assert info["kept_in_float"]["transformer"] > 0  # the LoRA-wrapped q/k/v keep their float base weights
    got, expected = _run(pipe), _run(reference)
    assert (got - expected).abs().max().item() < 0.05  # int8 elsewhere: close, not equal
    pipe.set_adapters(["a"], [0.5]), reference.set_adapters(["a"], [0.5])
    assert (_run(pipe) - _run(reference)).abs().max().item() < 0.05
    cachedit.disable(pipe)
    assert torch.equal(_run(pipe), _run(reference))
