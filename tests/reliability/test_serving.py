"""Serving: a transformer called directly, request after request, with a cache. Nothing is keyed by memory
addresses: requests are told apart by `cachedit.request(pipe)` or, without it, by the timestep schedule
restarting; unnamed CFG branches by their order at a timestep. Over 1,000 requests, with and without grad,
with a new text tensor at every call and some requests abandoned midway, every request's result equals the
same request on a freshly accelerated pipeline (bitwise: same code path, same inputs), at most one request's
states are alive, nothing with grad history outlives its request, and the process's RSS stays flat."""

from __future__ import annotations

import gc
import os
import weakref

import diffusers
import pytest
import torch

import cachedit
from cachedit.cache.runs import MAX_BRANCHES, RunTracker

REQUESTS = 1000
TIMESTEPS = (1.0, 0.5)  # two steps: the second caches, reusing the first one's residual
CACHE = dict(residual_diff_threshold=100.0, warmup_steps=1)
EXACT = dict(device="cpu_ref", attention="torch_sdpa")
KINDS = 4  # request kinds (latents, prompt embeddings); the last one runs CFG (two unnamed calls a step)
RSS_GROWTH_MIB = 24


def _pipeline() -> diffusers.FluxPipeline:
    """A FLUX pipeline holding only a minimal transformer (1 + 1 blocks): serving calls the transformer alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    return diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def _kind(index: int) -> dict:
    g = torch.Generator().manual_seed(index)
    texts = [torch.randn(1, 8, 16, generator=g) for _ in range(2 if index == KINDS - 1 else 1)]
    return dict(latents=torch.randn(1, 16, 4, generator=g), texts=texts, pooled=torch.randn(1, 8, generator=g))


def _serve(pipe, kind: dict, abandon: bool = False):
    """One request: an Euler loop over TIMESTEPS, a new text tensor at every call (CFG: cond then uncond at
    each timestep, guidance 2). Returns the final latents and the leaf the request's graph hangs from."""
    latents = kind["latents"].clone().requires_grad_(torch.is_grad_enabled())
    leaf, ids = latents, dict(img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))
    for i, t in enumerate(TIMESTEPS):
        preds = [pipe.transformer(hidden_states=latents, encoder_hidden_states=text.clone(), timestep=torch.tensor([t]),
                                  pooled_projections=kind["pooled"], return_dict=False, **ids)[0] for text in kind["texts"]]
        pred = preds[0] if len(preds) == 1 else preds[1] + 2.0 * (preds[0] - preds[1])
        if abandon:
            raise ConnectionAbortedError("client went away")
        latents = latents + ((TIMESTEPS + (0.0,))[i + 1] - t) * pred
    return latents.detach(), leaf


def _live_states(pipe) -> int:
    return sum(c.states.live() for c in cachedit.applied(pipe)["cache"].parts["transformer"].stacks)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture(scope="module")
def fresh():
    """Per (kind, grad): the request's result on a pipeline accelerated for it alone."""
    out = {}
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            for k in range(KINDS):
                pipe = _pipeline()
                cachedit.accelerate(pipe, **EXACT, cache=CACHE)
                out[k, grad] = _serve(pipe, _kind(k))[0]
                report = cachedit.summary(pipe)["cache"]["transformer"]["stacks"][0]["contexts"]
                assert all(r["cached_steps"] == [1] for r in report.values()) and len(report) == len(_kind(k)["texts"])
    return out


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_1000_requests_isolated_bounded_and_flat(grad, fresh):
    pipe = _pipeline()
    cachedit.accelerate(pipe, **EXACT, cache=CACHE)
    kinds = [_kind(k) for k in range(KINDS)]
    previous, rss = None, []
    with torch.set_grad_enabled(grad):
        for i in range(REQUESTS):
            k, explicit, abandon = (i * 7) % KINDS, i % 2 == 0, i % 10 == 3
            try:
                if explicit:
                    with cachedit.request(pipe):
                        result, leaf = _serve(pipe, kinds[k], abandon)
                    assert _live_states(pipe) == 0, f"request {i}: states outlived `with cachedit.request`"
                else:  # no request marked: the restarting schedule starts fresh state
                    result, leaf = _serve(pipe, kinds[k], abandon)
                    assert _live_states(pipe) <= len(kinds[k]["texts"]), f"request {i}: {_live_states(pipe)} states"
            except ConnectionAbortedError:
                continue
            finally:
                if previous is not None:  # the request before this one: nothing of its graph is held
                    assert previous() is None, f"request {i}: the previous request's graph is still alive"
            assert torch.equal(result, fresh[k, grad]), f"request {i} (kind {k}) differs from a fresh pipeline's"
            previous = weakref.ref(leaf) if grad and explicit else None
            del leaf
            if i in (100, REQUESTS - 1):
                gc.collect()
                rss.append(_rss_mib())
    assert rss[1] - rss[0] <= RSS_GROWTH_MIB, f"RSS grew {rss[1] - rss[0]:.1f} MiB over {REQUESTS - 101} requests"


def test_run_tracker_names_branches_by_order_and_sees_restarts():
    runs = RunTracker()
    # Falling timesteps, two unnamed calls a step; the second branch dropped at the last step (CFG truncation).
    seen = [runs.observe(t, None) for t in (1.0, 1.0, 0.6, 0.6, 0.2)]
    assert seen == [("branch0", False), ("branch1", False), ("branch0", False), ("branch1", False), ("branch0", False)]
    assert runs.observe(1.0, None) == ("branch0", True)  # back to the start: a new run
    runs.clear()
    # Rising timesteps (Lumina2 passes 1 - t): progress, not a restart; going back is one.
    assert [runs.observe(t, None)[1] for t in (0.0, 0.5, 0.9, 0.1)] == [False, False, False, True]
    runs.clear()
    # Named branches: the same branch at the same timestep again is a new run (repeated one-step requests).
    assert [runs.observe(t, n)[1] for t, n in ((1.0, "cond"), (1.0, "uncond"), (0.5, "cond"), (0.5, "uncond"),
                                               (1.0, "cond"))] == [False, False, False, False, True]
    runs.clear()
    assert [runs.observe(1.0, None)[1] for _ in range(MAX_BRANCHES + 1)] == [False] * MAX_BRANCHES + [True]


def test_request_needs_an_accelerated_pipe_and_a_valid_step_count():
    pipe = _pipeline()
    with pytest.raises(ValueError, match=r"request\(pipe\): pipe is not accelerated"):
        with cachedit.request(pipe):
            pass
    cachedit.accelerate(pipe, **EXACT, cache=CACHE)
    with pytest.raises(ValueError, match="num_inference_steps=0 is invalid; allowed values: an integer >= 1"):
        with cachedit.request(pipe, num_inference_steps=0):
            pass
    assert pipe._cachedit_state.num_steps_override is None
