"""quantize=: every scheme through the backend's path (cpu_ref emulation here), memory, exclusions, disable."""

from __future__ import annotations

import pytest
import torch

import cachedit
from cachedit.metrics import psnr
from cachedit.quant.linear import QuantizedLinear, weight_bytes
from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

SCHEMES = [dict(scheme="fp8", granularity="tensor"), dict(scheme="fp8", granularity="row"),
           dict(scheme="int8", granularity="tensor"), dict(scheme="int8", granularity="row"),
           dict(scheme="int8", granularity="row", weight_only=True)]
# Random tiny FLUX, 4 steps, float32: PSNR of the quantized image against the unquantized one.
MIN_PSNR_DB = 30.0


def _run(pipe):
    return pipe(prompt="a photo of a cat", **tiny_call_kwargs("flux"))[0]


@pytest.mark.parametrize("quant", SCHEMES, ids=lambda q: "-".join(str(v) for v in q.values()))
def test_scheme_quality_memory_and_exact_disable(quant):
    pipe = tiny_pipeline("flux", dtype=torch.bfloat16)
    base = _run(pipe)
    bf16_bytes = weight_bytes(pipe.transformer)
    cachedit.accelerate(pipe, device="cpu_ref", attention="torch_sdpa", quantize=quant)
    out = _run(pipe)
    info = cachedit.summary(pipe)["quantize"]
    linears = [m for m in pipe.transformer.modules() if isinstance(m, QuantizedLinear)]
    assert info["linears"]["transformer"] == len(linears) > 0
    assert all(m.qweight.element_size() == 1 for m in linears)
    quantized_linear_bytes = sum(m.qweight.numel() * 2 for m in linears)  # what they held in bf16
    stored = sum(weight_bytes(m) - (m.bias.numel() * m.bias.element_size() if m.bias is not None else 0)
                 for m in linears)
    assert stored <= 0.55 * quantized_linear_bytes, "quantized weights must take about half of bf16"
    assert info["weight_bytes"]["transformer"] < bf16_bytes
    assert psnr(out, base) >= MIN_PSNR_DB
    cachedit.disable(pipe)
    assert not any(isinstance(m, QuantizedLinear) for m in pipe.transformer.modules())
    assert torch.equal(_run(pipe), base)


def test_exclusions_by_name_pattern():
    pipe = tiny_pipeline("flux")
    cachedit.accelerate(pipe, device="cpu_ref", quantize=dict(scheme="int8", exclude=("*embed*", "*norm*", "proj_out",
                                                                                       "*ff*")))
    names = {n for n, m in pipe.transformer.named_modules() if isinstance(m, QuantizedLinear)}
    assert names and not any("ff" in n or "embed" in n or "norm" in n or n == "proj_out" for n in names)
    assert any(n.endswith("attn.to_q") for n in names)


def test_freed_originals_refuse_disable_before_changing_anything():
    pipe = tiny_pipeline("flux")
    cachedit.accelerate(pipe, device="cpu_ref", quantize=dict(scheme="fp8", keep_original=False), cache=dict(
        residual_diff_threshold=0.1))
    with pytest.raises(RuntimeError, match="keep_original=False"):
        cachedit.disable(pipe)
    assert cachedit.summary(pipe)["accelerated"] and cachedit.summary(pipe)["cache"] is not None


def test_exclude_everything_is_a_clear_error():
    pipe = tiny_pipeline("flux")
    with pytest.raises(ValueError, match=r"quantize.exclude=\('\*',\) leaves no nn.Linear of pipe.transformer"):
        cachedit.accelerate(pipe, device="cpu_ref", quantize=dict(exclude=("*",)))
    assert cachedit.summary(pipe) == {"accelerated": False}
