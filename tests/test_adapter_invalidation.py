"""An adapter change never lets the cache reuse residuals of the old weights: between pipeline calls
(set_adapters, fuse, unfuse, unload), inside one pipeline call (a step callback changing the weight)
and between two transformer calls inside one `cachedit.request`. Each is compared with what a fresh
cache state computes from that point (bitwise: the same code path on the same inputs), and the
cache skips enough that reusing old residuals would show."""

from __future__ import annotations

import pytest
import torch

import cachedit
from cachedit.cache.adapter_watch import HOOK_NAME
from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

peft = pytest.importorskip("peft")

SKIPS = dict(Fn=1, Bn=0, residual_diff_threshold=100.0, warmup_steps=2)  # random weights: caches every step allowed
STEPS = 6


def _kwargs(**extra):
    kwargs = tiny_call_kwargs("flux", num_inference_steps=STEPS)
    kwargs.pop("negative_prompt"), kwargs.pop("true_cfg_scale")  # one transformer call per step
    return {**kwargs, **extra}


def _run(pipe, **extra):
    return pipe(prompt="a photo of a cat", **_kwargs(**extra))[0]


def _lora_pipe(lora_dir, cache=SKIPS):
    pipe = tiny_pipeline("flux")
    pipe.load_lora_weights(lora_dir, adapter_name="a")
    if cache is not None:
        cachedit.accelerate(pipe, device="cpu_ref", cache=cache)
    return pipe


def _cached(pipe):
    (report,) = cachedit.summary(pipe)["cache"]["transformer"]["stacks"][0]["contexts"].values()
    return report["cached_steps"]


OPS = {"set_adapters 0.3": lambda p: p.set_adapters(["a"], [0.3]), "fuse_lora": lambda p: p.fuse_lora(),
       "unload_lora_weights": lambda p: p.unload_lora_weights()}


@pytest.mark.parametrize("op", list(OPS))
def test_between_pipeline_calls(lora_dir, op):
    pipe = _lora_pipe(lora_dir)
    _run(pipe)
    OPS[op](pipe)
    got = _run(pipe)
    fresh = _lora_pipe(lora_dir, cache=None)
    OPS[op](fresh)
    cachedit.accelerate(fresh, device="cpu_ref", cache=SKIPS)
    assert torch.equal(got, _run(fresh)) and _cached(pipe) == list(range(2, STEPS))
    if op == "fuse_lora":  # and back
        pipe.unfuse_lora(), fresh.unfuse_lora()
        assert torch.equal(_run(pipe), _run(fresh))


def test_inside_one_pipeline_call(lora_dir):
    """A step callback sets another weight after step 2: step 3 computes afresh instead of reusing step 2's
    residual (the old weight's); without the change every step from 2 on is cached."""
    def callback(pipe, step, timestep, kwargs):
        if step == 2:
            pipe.set_adapters(["a"], [0.3])
        return {}

    pipe = _lora_pipe(lora_dir)
    _run(pipe)
    assert _cached(pipe) == [2, 3, 4, 5]
    pipe.set_adapters(["a"], [1.0])
    _run(pipe, callback_on_step_end=callback)
    assert 3 not in _cached(pipe)  # fresh state at step 3: nothing stored to reuse, so it computes
    assert pipe.transformer._diffusers_hook.hooks[HOOK_NAME].invalidations == 1


def test_between_two_transformer_calls_inside_a_request(lora_dir):
    """Direct transformer calls inside one `cachedit.request`: after set_adapters the remaining calls equal
    a fresh request of those calls at the new weight, bit for bit."""
    recorder = _lora_pipe(lora_dir, cache=None)
    calls = []
    handle = recorder.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(k), with_kwargs=True)
    _run(recorder)
    handle.remove()
    pipe = _lora_pipe(lora_dir)
    half = STEPS // 2
    with torch.no_grad(), cachedit.request(pipe):
        [pipe.transformer(**k)[0] for k in calls[:half]]
        pipe.set_adapters(["a"], [0.3])
        changed = [pipe.transformer(**k)[0] for k in calls[half:]]
    with torch.no_grad(), cachedit.request(pipe):
        fresh = [pipe.transformer(**k)[0] for k in calls[half:]]
    assert all(torch.equal(a, b) for a, b in zip(changed, fresh))
    # What the watch prevents: the same request without it reuses the old weight's residual.
    pipe.set_adapters(["a"], [1.0])
    watch = pipe.transformer._diffusers_hook.hooks[HOOK_NAME]
    watch.caches = []  # it sees the change, but has no state to release
    with torch.no_grad(), cachedit.request(pipe):
        [pipe.transformer(**k)[0] for k in calls[:half]]
        pipe.set_adapters(["a"], [0.3])
        stale = [pipe.transformer(**k)[0] for k in calls[half:]]
    assert not torch.equal(stale[0], fresh[0])
