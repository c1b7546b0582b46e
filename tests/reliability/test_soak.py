"""A 200-call soak of one accelerated pipeline: steps, batch, image size, prompt and CFG vary from call to call
and about one call in six is interrupted. Every completed call equals, bit for bit, the same call on a
pipeline accelerated afresh for it (same code path, same inputs: equality holds by construction), and
reports its own step count."""

from __future__ import annotations

import random

import torch

import cachedit
from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

from .interrupts import Abort, abort_at_call, raise_at

CALLS = 200
EXACT = dict(device="cpu_ref", attention="torch_sdpa")
# Random weights change ~0.2-0.5 per step: everything allowed caches (after one warmup step, one skip in a row).
CACHE = dict(residual_diff_threshold=100.0, warmup_steps=1, max_continuous_cached_steps=1, calibrator="taylorseer")
PROMPTS = ("a photo of a cat", "a red monkey eating a burger")
SIZES = ((32, 32), (32, 48))


def _call(pipe, steps, batch, size, prompt, cfg, **extra):
    kwargs = tiny_call_kwargs("flux", num_inference_steps=steps)
    if not cfg:
        kwargs.pop("negative_prompt"), kwargs.pop("true_cfg_scale")
    kwargs.update(height=size[0], width=size[1], num_images_per_prompt=batch, **extra)
    return pipe(prompt=prompt, **kwargs)[0]


def test_200_varied_calls_with_interruptions_each_equal_a_fresh_pipeline():
    rng = random.Random(13)
    pipe, ref = tiny_pipeline("flux"), tiny_pipeline("flux")
    cachedit.accelerate(pipe, **EXACT, cache=CACHE)
    expected: dict[tuple, torch.Tensor] = {}
    compared = interrupted = cached = 0
    for i in range(CALLS):
        key = (rng.choice((2, 3)), rng.choice((1, 2)), rng.choice(SIZES), rng.choice(PROMPTS), rng.random() < 0.5)
        steps, _, _, _, cfg = key
        if rng.random() < 1 / 6:  # interrupted at a random step end or transformer call
            if rng.random() < 0.5:
                error, extra, call = KeyboardInterrupt, dict(callback_on_step_end=raise_at(rng.randrange(steps),
                                                                                          KeyboardInterrupt())), None
            else:
                error, extra, call = Abort, {}, rng.randrange(steps * (2 if cfg else 1))
            try:
                with abort_at_call(pipe.transformer, call):
                    _call(pipe, *key, **extra)
                raise AssertionError(f"call {i}: the interruption did not interrupt")
            except error:
                interrupted += 1
            continue
        out = _call(pipe, *key)
        contexts = cachedit.summary(pipe)["cache"]["transformer"]["stacks"][0]["contexts"]
        assert set(contexts) == ({"cond", "uncond"} if cfg else {"cond"}), f"call {i}: {sorted(contexts)}"
        assert all(c["steps"] == steps for c in contexts.values()), f"call {i}: {contexts}"
        cached += sum(len(c["cached_steps"]) for c in contexts.values())
        if key not in expected:  # the same call on a pipeline accelerated for it alone
            cachedit.accelerate(ref, **EXACT, cache=CACHE)
            expected[key] = _call(ref, *key)
            cachedit.disable(ref)
        assert torch.equal(out, expected[key]), f"call {i} {key} differs from a fresh pipeline's"
        compared += 1
    assert compared + interrupted == CALLS and interrupted >= 20 and cached >= compared, (compared, interrupted, cached)
