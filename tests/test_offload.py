"""cachedit with diffusers' offloading (model, sequential and group offload, block- and leaf-level), in
either order. On a CPU machine onload and offload devices are both the CPU, so the same ops run on the same
inputs as without offloading: outputs are compared bitwise with offloading alone. What this exercises is
the hook composition: diffusers' offload hooks and cachedit's sit on the same blocks."""

from __future__ import annotations

import pytest
import torch

import cachedit
from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

CPU = torch.device("cpu")
NEVER_SKIP = dict(Fn=1, Bn=0, residual_diff_threshold=0, warmup_steps=0)
SKIPS = dict(Fn=1, Bn=0, residual_diff_threshold=100.0, warmup_steps=2)  # random weights: caches every step allowed


def _offload(pipe, kind: str) -> None:
    if kind == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    elif kind == "sequential":
        # What enable_sequential_cpu_offload does per component, for the transformer: with torch 2.13 and
        # transformers 5.24, accelerate's meta-device offload of the CLIP text encoder fails on its own
        # (TypeError in accelerate.utils.modeling.set_module_tensor_to_device), with or without cachedit.
        import accelerate

        accelerate.cpu_offload(pipe.transformer, execution_device=CPU)
    else:
        level = kind.split("-")[1] + "_level"
        extra = {"num_blocks_per_group": 1} if level == "block_level" else {}
        pipe.transformer.enable_group_offload(onload_device=CPU, offload_device=CPU, offload_type=level, **extra)


def _run(pipe):
    return pipe(prompt="a photo of a cat", **tiny_call_kwargs("flux", num_inference_steps=6))[0]


@pytest.mark.parametrize("kind", ["model", "sequential", "group-block", "group-leaf"])
@pytest.mark.parametrize("order", ["offload first", "cache first"])
def test_offloading_composes_with_the_cache(kind, order):
    alone = tiny_pipeline("flux")
    _offload(alone, kind)
    expected = _run(alone)
    for cache in (NEVER_SKIP, SKIPS):
        pipe = tiny_pipeline("flux")
        if order == "offload first":
            _offload(pipe, kind)
            cachedit.accelerate(pipe, device="cpu_ref", cache=cache)
        else:
            cachedit.accelerate(pipe, device="cpu_ref", cache=cache)
            _offload(pipe, kind)
        got = _run(pipe)
        fraction = cachedit.summary(pipe)["cache"]["transformer"]["computed_fraction"]
        if cache is NEVER_SKIP:
            assert fraction == 1.0 and torch.equal(got, expected), f"{kind}, {order}"
        else:  # the same skips as without offloading
            plain = tiny_pipeline("flux")
            cachedit.accelerate(plain, device="cpu_ref", cache=cache)
            assert fraction < 1.0 and torch.equal(got, _run(plain)), f"{kind}, {order}"
        cachedit.disable(pipe)
        assert torch.equal(_run(pipe), expected), f"{kind}, {order}: disable() left offloading changed"


def test_group_offload_composes_with_quantization_and_compile():
    alone = tiny_pipeline("flux")
    cachedit.accelerate(alone, device="cpu_ref", quantize=dict(scheme="int8"), compile=dict(backend="eager"))
    expected = _run(alone)
    pipe = tiny_pipeline("flux")
    cachedit.accelerate(pipe, device="cpu_ref", quantize=dict(scheme="int8"), compile=dict(backend="eager"),
                        cache=NEVER_SKIP)
    _offload(pipe, "group-block")
    assert torch.equal(_run(pipe), expected)
