"""The default path changes nothing the user did not ask for: with nothing skipped, an accelerated pipeline
is bitwise the plain, never-accelerated one. That holds by construction on any CPU (the very same ops run on
the very same inputs), so it is asserted bitwise."""

from __future__ import annotations

import pytest
import torch

import cachedit
from cachedit.testing.reference import digit_prompt, reference_call_kwargs, reference_pipeline
from cachedit.testing.tiny import TINY_FAMILIES, tiny_call_kwargs, tiny_pipeline

PROMPT = "a photo of a cat"
# Caches that never skip: threshold 0, and a positive threshold no step of a random model gets under
# (relative residual changes are ~0.2-0.5), which computes the decision statistic and feeds a calibrator.
NEVER_SKIP = {
    "threshold 0": dict(Fn=1, Bn=0, residual_diff_threshold=0, warmup_steps=0),
    "threshold 1e-9 +TaylorSeer": dict(Fn=1, Bn=0, residual_diff_threshold=1e-9, warmup_steps=0,
                                      calibrator="taylorseer"),
}


def _images(out):
    return out.images if hasattr(out, "images") else out.frames


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_never_skipping_cache_is_bitwise_the_plain_pipeline(family):
    expected = _images(tiny_pipeline(family)(prompt=PROMPT, **tiny_call_kwargs(family, num_inference_steps=5)))
    pipe = tiny_pipeline(family)
    for name, cache in NEVER_SKIP.items():
        cachedit.accelerate(pipe, device="cpu_ref", cache=cache)
        got = _images(pipe(prompt=PROMPT, **tiny_call_kwargs(family, num_inference_steps=5)))
        assert cachedit.summary(pipe)["cache"]["transformer"]["computed_fraction"] == 1.0, name
        assert cachedit.summary(pipe)["attention"]["eager_calls"] == {}, "nothing needed routing"
        assert torch.equal(got, expected), f"{family}, {name}: not bitwise the plain pipeline"
        cachedit.disable(pipe)


def test_never_skipping_cache_is_bitwise_the_plain_reference_pipeline():
    prompts = [digit_prompt(3), digit_prompt(8)]
    expected = reference_pipeline()(prompt=prompts, **reference_call_kwargs(6, seed=1)).images
    pipe = reference_pipeline()
    for name, cache in {"threshold 0": NEVER_SKIP["threshold 0"],
                        "warmup covers every step": dict(residual_diff_threshold=0.5, warmup_steps=6,
                                                         calibrator="taylorseer")}.items():
        cachedit.accelerate(pipe, device="cpu_ref", cache=cache)
        got = pipe(prompt=prompts, **reference_call_kwargs(6, seed=1)).images
        assert cachedit.summary(pipe)["cache"]["transformer"]["computed_fraction"] == 1.0, name
        assert torch.equal(got, expected), name
        cachedit.disable(pipe)
