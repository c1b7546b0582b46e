"""Accelerated pipeline calls run under torch.inference_mode (cachedit/inference.py): bitwise the plain
pipeline's outputs, handed back as normal tensors; plain no_grad where offloading moves parameters or where
the user turned it off."""

from __future__ import annotations

import pytest
import torch

import cachedit
from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

NEVER_SKIP = dict(residual_diff_threshold=0)
CPU = torch.device("cpu")


def _run(pipe, seen=None, **kw):
    """One call; `seen` collects whether each step ran in inference mode."""
    def step_end(pipe, i, t, tensors):
        seen.append(torch.is_inference_mode_enabled())
        return tensors

    extra = dict(callback_on_step_end=step_end) if seen is not None else {}
    return pipe(prompt="a photo of a cat", **{**tiny_call_kwargs("flux", num_inference_steps=4), **extra, **kw})[0]


@pytest.mark.parametrize("config", [dict(cache=NEVER_SKIP), dict(attention="torch_sdpa"), {}],
                         ids=["never-skipping cache", "attention only", "nothing else"])
def test_calls_run_in_inference_mode_and_equal_the_plain_pipeline(config):
    pipe = tiny_pipeline("flux")
    seen = []
    plain = _run(pipe, seen)
    assert seen and not any(seen)  # the plain pipeline: no_grad only
    cachedit.accelerate(pipe, device="cpu_ref", **config)
    seen = []
    got = _run(pipe, seen)
    assert seen and all(seen)
    assert torch.equal(got, plain)  # the same kernels on the same inputs
    assert cachedit.summary(pipe)["inference_mode"] is True
    cachedit.disable(pipe)
    seen = []
    assert torch.equal(_run(pipe, seen), plain) and not any(seen)


@pytest.mark.parametrize("output_type", ["pt", "latent"])
@pytest.mark.parametrize("return_dict", [True, False])
def test_returned_tensors_are_normal_tensors(output_type, return_dict):
    pipe = tiny_pipeline("flux")
    cachedit.accelerate(pipe, device="cpu_ref", cache=NEVER_SKIP)
    out = pipe(prompt="a cat", **{**tiny_call_kwargs("flux", num_inference_steps=2), "output_type": output_type,
                                  "return_dict": return_dict})
    images = out.images if return_dict else out[0]
    assert isinstance(images, torch.Tensor) and not images.is_inference()
    images.add_(1)  # an in-place update outside inference mode: refused for inference tensors
    weight = torch.ones(images.shape[-1], requires_grad=True)
    (images * weight).sum().backward()  # usable in autograd
    assert weight.grad is not None


def test_turned_off_by_argument_and_by_config_file(tmp_path):
    for kwargs in (dict(inference_mode=False), dict(config={"inference_mode": False})):
        pipe = tiny_pipeline("flux")
        plain = _run(pipe)
        cachedit.accelerate(pipe, device="cpu_ref", cache=NEVER_SKIP, **kwargs)
        seen = []
        assert torch.equal(_run(pipe, seen), plain) and seen and not any(seen)
        assert cachedit.summary(pipe)["inference_mode"] is False


@pytest.mark.parametrize("bad", ["yes", 1])
def test_a_bad_value_is_refused_before_anything_changes(bad):
    pipe = tiny_pipeline("flux")
    with pytest.raises(ValueError, match="inference_mode"):
        cachedit.accelerate(pipe, device="cpu_ref", cache=NEVER_SKIP, inference_mode=bad)
    with pytest.raises(ValueError, match="config.inference_mode"):
        cachedit.accelerate(pipe, device="cpu_ref", config={"inference_mode": bad})
    assert not cachedit.is_accelerated(pipe) and type(pipe).__name__ == "FluxPipeline"


def _offload(pipe, kind):
    if kind == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    elif kind == "sequential":
        import accelerate

        accelerate.cpu_offload(pipe.transformer, execution_device=CPU)  # see tests/test_offload.py
    else:
        pipe.transformer.enable_group_offload(onload_device=CPU, offload_device=CPU, offload_type=kind,
                                              **({"num_blocks_per_group": 1} if kind == "block_level" else {}))


@pytest.mark.parametrize("kind", ["model", "sequential", "block_level", "leaf_level"])
def test_offloading_keeps_no_grad(kind):
    """Offload hooks move parameters inside the call; under inference mode they would come back as inference
    tensors (a later fuse_lora or optimizer step on them fails), so such calls keep no_grad."""
    pipe = tiny_pipeline("flux")
    cachedit.accelerate(pipe, device="cpu_ref", cache=NEVER_SKIP)
    _offload(pipe, kind)
    seen = []
    _run(pipe, seen)
    assert seen and not any(seen)
    assert not any(p.is_inference() for p in pipe.transformer.parameters())


def test_tensor_subclass_weights_keep_no_grad():
    """torchao's quantized weights are tensor subclasses, which cannot be viewed under inference mode ("Cannot set
    version_counter for inference tensor"): such a pipeline runs under no_grad and equals its plain self."""
    torchao_quant = pytest.importorskip("torchao.quantization")
    pipe = tiny_pipeline("flux")
    torchao_quant.quantize_(pipe.transformer, torchao_quant.Int8WeightOnlyConfig())
    want = _run(pipe, output_type="pt")
    cachedit.accelerate(pipe, device="cpu_ref", cache=NEVER_SKIP)
    seen = []
    got = _run(pipe, seen, output_type="pt")
    assert seen and not any(seen)
    assert torch.equal(got, want)
    assert cachedit.summary(pipe)["inference_mode"] is True  # asked for; this pipeline's calls keep no_grad
