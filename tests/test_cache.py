"""DBCache / DBPrune / calibrators / step masks on the tiny pipelines of every family."""

from __future__ import annotations

import pytest
import torch

import cachedit
from cachedit.cache.calibrators import FoCa, TaylorSeer
from cachedit.cache.masks import steps_mask
from cachedit.testing.tiny import TINY_FAMILIES, tiny_call_kwargs, tiny_pipeline

PROMPT = "a photo of a cat"
STEPS = 8
# The default path keeps the model's own SDPA calls, so cached-vs-uncached differences come from the cache alone.
EXACT = dict(device="cpu_ref")
# Random weights change a lot between steps (relative diffs ~0.2-0.5): this threshold caches everything allowed.
ALWAYS = 100.0


def _run(pipe, family, steps=STEPS, **overrides):
    kwargs = {**tiny_call_kwargs(family, num_inference_steps=steps), **overrides}
    return pipe(prompt=PROMPT, **kwargs)[0]


def _contexts(pipe, component="transformer", stack=0):
    return cachedit.summary(pipe)["cache"][component]["stacks"][stack]["contexts"]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_threshold_zero_is_bitwise_and_every_family_caches(family):
    pipe = tiny_pipeline(family)
    base = _run(pipe, family)
    cachedit.accelerate(pipe, **EXACT, cache=dict(Fn=1, Bn=0, residual_diff_threshold=0, warmup_steps=0))
    assert torch.equal(_run(pipe, family), base)
    assert cachedit.summary(pipe)["cache"]["transformer"]["computed_fraction"] == 1.0
    cachedit.disable(pipe)

    cachedit.accelerate(pipe, **EXACT, cache=dict(Fn=1, Bn=0, residual_diff_threshold=ALWAYS, warmup_steps=2))
    cached = _run(pipe, family)
    info = cachedit.summary(pipe)["cache"]
    for name in (n for n in info if n != "config"):
        assert info[name]["computed_fraction"] < 1.0, f"{family}.{name} never cached"
        for stack in info[name]["stacks"]:
            for ctx, report in stack["contexts"].items():
                assert report["cached_steps"], f"{family}.{name} context {ctx} cached nothing"
                assert all(s >= 2 for s in report["cached_steps"]), "warmup steps must compute"
    assert torch.isfinite(cached).all() and not torch.equal(cached, base)
    cachedit.disable(pipe)
    assert torch.equal(_run(pipe, family), base)


def test_cfg_branches_have_separate_state():
    pipe = tiny_pipeline("flux")  # true CFG: the pipeline names its calls "cond" and "uncond"
    cachedit.accelerate(pipe, **EXACT, cache=dict(residual_diff_threshold=ALWAYS, warmup_steps=2))
    _run(pipe, "flux")
    contexts = _contexts(pipe)
    assert set(contexts) == {"cond", "uncond"}
    for report in contexts.values():
        assert report["steps"] == STEPS and report["cached_steps"] == list(range(2, STEPS))


@pytest.mark.parametrize("family, names", [("flux", ("cond", "uncond")), ("chroma", ("branch0", "branch1"))])
def test_branch_thresholds_give_each_cfg_branch_its_own(family, names):
    pipe = tiny_pipeline(family)
    base = dict(residual_diff_threshold=ALWAYS, warmup_steps=2)
    cachedit.accelerate(pipe, **EXACT, cache=base)
    uniform = _run(pipe, family)
    cachedit.disable(pipe)
    cachedit.accelerate(pipe, **EXACT, cache=dict(base, branch_thresholds={names[0]: ALWAYS}))
    assert torch.equal(_run(pipe, family), uniform)  # the same thresholds, spelled out: the same computation
    cachedit.disable(pipe)
    cachedit.accelerate(pipe, **EXACT, cache=dict(base, branch_thresholds={names[1]: 0}))
    _run(pipe, family)
    contexts = _contexts(pipe)
    assert contexts[names[0]]["cached_steps"] == list(range(2, STEPS)) and contexts[names[1]]["cached_steps"] == []


@pytest.mark.parametrize("value", [{"uncond": -1}, {"uncond": float("nan")}, {"": 0.1}, ["uncond"], {"cond": "x"}])
def test_invalid_branch_thresholds_are_refused(value):
    with pytest.raises(ValueError, match="branch_thresholds"):
        cachedit.CacheConfig(branch_thresholds=value)


def test_branch_thresholds_with_cfg_parallel_are_refused_before_any_change():
    pipe = tiny_pipeline("flux")
    with pytest.raises(ValueError, match="branch_thresholds=.* with ParallelConfig.cfg=2"):
        cachedit.accelerate(pipe, **EXACT, cache=dict(branch_thresholds={"uncond": 0.3}), parallel=dict(cfg=2))
    assert not cachedit.is_accelerated(pipe)


def test_unnamed_cfg_branches_are_told_apart_by_their_order_at_a_timestep():
    pipe = tiny_pipeline("lumina2")  # calls cond and uncond without cache_context
    cachedit.accelerate(pipe, **EXACT, cache=dict(residual_diff_threshold=ALWAYS, warmup_steps=2))
    _run(pipe, "lumina2")
    contexts = _contexts(pipe)
    assert set(contexts) == {"branch0", "branch1"}
    assert all(r["steps"] == STEPS and r["cached_steps"] for r in contexts.values())


def test_batched_cfg_uses_one_state_for_the_batch():
    pipe = tiny_pipeline("sd3")  # one call on a batch of cond+uncond per step
    base = _run(pipe, "sd3")
    cachedit.accelerate(pipe, **EXACT, cache=dict(residual_diff_threshold=ALWAYS, warmup_steps=3))
    out = _run(pipe, "sd3")
    (report,) = _contexts(pipe).values()
    assert report["steps"] == STEPS and report["cached_steps"] == list(range(3, STEPS))
    assert out.shape == base.shape and torch.isfinite(out).all()


def test_consecutive_calls_with_other_step_counts_match_a_fresh_pipeline():
    config = dict(residual_diff_threshold=0.35, warmup_steps=1, max_continuous_cached_steps=2)
    used = tiny_pipeline("flux")
    cachedit.accelerate(used, **EXACT, cache=config)
    _run(used, "flux", steps=5)
    _run(used, "flux", steps=11)
    second = _run(used, "flux", steps=7)
    fresh = tiny_pipeline("flux")
    cachedit.accelerate(fresh, **EXACT, cache=config)
    assert torch.equal(second, _run(fresh, "flux", steps=7))
    assert _contexts(used) == _contexts(fresh)


def test_transformer_called_directly_with_refresh():
    pipe = tiny_pipeline("flux")
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(k), with_kwargs=True)
    kwargs = tiny_call_kwargs("flux", num_inference_steps=STEPS)
    kwargs.pop("negative_prompt"), kwargs.pop("true_cfg_scale")
    pipe(prompt=PROMPT, **kwargs)
    handle.remove()
    cachedit.accelerate(pipe, **EXACT, cache=dict(residual_diff_threshold=0.35, warmup_steps=1))
    served = []
    for _ in range(2):  # two "requests" replayed on the bare transformer, refreshed in between
        cachedit.refresh(pipe)
        served.append([pipe.transformer(**k)[0] for k in calls])
    via_pipeline = pipe(prompt=PROMPT, **{**kwargs, "generator": torch.Generator().manual_seed(0)})
    assert all(torch.equal(a, b) for a, b in zip(*served))
    assert _contexts(pipe)["cond"]["cached_steps"]  # the pipeline call cached too
    with pytest.raises(ValueError, match="num_inference_steps=0 is invalid"):
        cachedit.refresh(pipe, num_inference_steps=0)
    assert via_pipeline is not None


def test_limits_are_respected():
    pipe = tiny_pipeline("flux")
    cachedit.accelerate(pipe, **EXACT, cache=dict(residual_diff_threshold=ALWAYS, warmup_steps=1,
                                                  max_continuous_cached_steps=2, max_cached_steps=4))
    _run(pipe, "flux", steps=12)
    for report in _contexts(pipe).values():
        assert report["cached_steps"] == [1, 2, 4, 5]


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_steps_masks(mode):
    mask = (1, 1, 0, 0, 1, 0, 0, 1)
    pipe = tiny_pipeline("flux")
    threshold = 0.35 if mode == "dynamic" else 0.0
    cachedit.accelerate(pipe, **EXACT, cache=dict(residual_diff_threshold=threshold, warmup_steps=0,
                                                  steps_mask=mask, mask_mode=mode))
    _run(pipe, "flux")
    zeros = [i for i, m in enumerate(mask) if m == 0]
    for report in _contexts(pipe).values():
        if mode == "static":
            assert report["cached_steps"] == zeros and report["residual_diffs"] == {}
        else:
            assert set(report["cached_steps"]) <= set(zeros)
            assert all(report["residual_diffs"][s] < threshold for s in report["cached_steps"])


def test_mask_policies_fit_any_step_count_and_resolve_from_the_pipeline():
    for policy, computed_28 in {"slow": 18, "medium": 15, "fast": 11, "ultra": 8}.items():
        for n in (4, 9, 28, 50):
            m = steps_mask(policy, n)
            assert len(m) == n and m[0] == 1 and m[-1] == 1
        assert sum(steps_mask(policy, 28)) == computed_28
    pipe = tiny_pipeline("flux")
    cachedit.accelerate(pipe, **EXACT, cache=dict(residual_diff_threshold=0, warmup_steps=0,
                                                  steps_mask="fast", mask_mode="static"))
    _run(pipe, "flux", steps=12)
    expected = [i for i, m in enumerate(steps_mask("fast", 12)) if m == 0]
    assert _contexts(pipe)["cond"]["cached_steps"] == expected


def test_dbprune_skips_blocks_but_never_protected_ones():
    pipe = tiny_pipeline("qwenimage")
    base = _run(pipe, "qwenimage")
    cachedit.accelerate(pipe, **EXACT, cache=dict(mode="dbprune", Fn=1, Bn=0, residual_diff_threshold=0,
                                                  warmup_steps=0))
    assert torch.equal(_run(pipe, "qwenimage"), base)
    cachedit.disable(pipe)
    cachedit.accelerate(pipe, **EXACT, cache=dict(mode="dbprune", Fn=1, Bn=0, residual_diff_threshold=ALWAYS,
                                                  warmup_steps=2, protected_blocks=(2,)))
    out = _run(pipe, "qwenimage")
    for report in _contexts(pipe).values():
        pruned = report["pruned_blocks"]
        assert pruned and all(set(ids) == {1, 3} for ids in pruned.values())
        assert report["blocks_computed"] == 4 * STEPS - 2 * len(pruned)
    assert torch.isfinite(out).all() and not torch.equal(out, base)


def test_calibrators_are_exact_on_their_model_class():
    line = lambda s: torch.full((3,), 2.0 + 0.5 * s)  # noqa: E731
    for calibrator in (TaylorSeer(order=1), TaylorSeer(order=2), FoCa()):
        for s in (0, 2, 5):  # computed steps at uneven gaps
            calibrator.update(s, line(s))
        for s in (6, 7):
            assert torch.allclose(calibrator.predict(s), line(s)), type(calibrator).__name__
    quad = lambda s: torch.full((2,), 1.0 + s * s)  # noqa: E731
    first, second = TaylorSeer(order=1), TaylorSeer(order=2)
    for s in (0, 1, 2):
        first.update(s, quad(s)), second.update(s, quad(s))
    # Backward differences at f = 1 + s^2: D1 = 3 (f' = 4 lags by f''/2), D2 = 2 exact; truth f(3) = 10.
    assert torch.equal(first.predict(3), torch.full((2,), 8.0))
    assert torch.equal(second.predict(3), torch.full((2,), 9.0))


@pytest.mark.parametrize("calibrator", ["taylorseer", "foca"])
def test_calibrated_cache_runs_and_differs_from_reuse(calibrator):
    pipe = tiny_pipeline("flux")
    config = dict(residual_diff_threshold=ALWAYS, warmup_steps=3, max_continuous_cached_steps=2)
    cachedit.accelerate(pipe, **EXACT, cache=config)
    reuse = _run(pipe, "flux")
    cachedit.disable(pipe)
    cachedit.accelerate(pipe, **EXACT, cache={**config, "calibrator": calibrator, "taylorseer_order": 2})
    forecast = _run(pipe, "flux")
    assert torch.isfinite(forecast).all() and not torch.equal(forecast, reuse)
    assert _contexts(pipe)["cond"]["cached_steps"] == [3, 4, 6, 7]


def test_cache_with_compile_keeps_decisions_out_of_graphs():
    import torch._dynamo.utils as dynamo_utils

    config = dict(residual_diff_threshold=0.35, warmup_steps=1, max_continuous_cached_steps=2)
    eager = tiny_pipeline("flux")
    cachedit.accelerate(eager, **EXACT, cache=config)
    expected = _run(eager, "flux")
    pipe = tiny_pipeline("flux")
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    cachedit.accelerate(pipe, **EXACT, cache=config, compile=True)
    out = _run(pipe, "flux")
    assert dict(dynamo_utils.counters["graph_break"]) == {}, "cache logic leaked into compiled graphs"
    assert _contexts(pipe) .keys() == _contexts(eager).keys()
    assert [r["cached_steps"] for r in _contexts(pipe).values()] == [r["cached_steps"] for r in _contexts(eager).values()]
    assert (out - expected).abs().max().item() < 1e-4
    cachedit.disable(pipe)


def test_matches_cache_dit_pattern_and_outputs():
    cache_dit = pytest.importorskip("cache_dit")
    kwargs = tiny_call_kwargs("flux", num_inference_steps=12)
    kwargs.pop("negative_prompt"), kwargs.pop("true_cfg_scale")  # cache-dit's FLUX adapter counts no CFG branches
    for threshold, Fn, Bn in ((0.3, 1, 0), (0.45, 1, 1), (0.6, 2, 1)):
        peer = tiny_pipeline("flux")
        cache_dit.enable_cache(peer, cache_config=cache_dit.DBCacheConfig(
            Fn_compute_blocks=Fn, Bn_compute_blocks=Bn, residual_diff_threshold=threshold, max_warmup_steps=2,
            max_continuous_cached_steps=2))
        peer_out = peer(prompt=PROMPT, **{**kwargs, "generator": torch.Generator().manual_seed(0)})[0]
        peer_steps = cache_dit.summary(peer)[0].cached_steps
        ours = tiny_pipeline("flux")
        cachedit.accelerate(ours, **EXACT, cache=dict(Fn=Fn, Bn=Bn, residual_diff_threshold=threshold,
                                                      warmup_steps=2, max_continuous_cached_steps=2))
        out = ours(prompt=PROMPT, **{**kwargs, "generator": torch.Generator().manual_seed(0)})[0]
        assert _contexts(ours)["cond"]["cached_steps"] == list(peer_steps), threshold
        assert (out - peer_out).abs().max().item() <= 1e-5, threshold


def _decisions_on_rank(rank, world, reduce):
    import cachedit as cd
    from cachedit.plugins import manager
    from cachedit.testing.tiny import tiny_call_kwargs as kw, tiny_pipeline as tp

    pipe = tp("flux")
    cd.accelerate(pipe, device="cpu_ref", cache=dict(residual_diff_threshold=0.3, warmup_steps=1))
    if reduce:  # what a parallel plan installs: the statistic averaged over its ranks
        comm = manager().communicator(manager().backends["cpu_ref"], None)
        for cache in cd.applied(pipe)["cache"].parts["transformer"].stacks:
            cache.reduce = lambda stats: comm.all_reduce(stats, "avg")
    prompts = ["a photo of a cat", "a red monkey eating a burger"]  # each rank sees different activations
    pipe(prompt=prompts[rank], **kw("flux", num_inference_steps=12))
    contexts = cd.summary(pipe)["cache"]["transformer"]["stacks"][0]["contexts"]
    return {name: (r["cached_steps"], r["residual_diffs"]) for name, r in contexts.items()}


def test_decisions_are_agreed_across_ranks():
    from cachedit.testing.distributed import run_distributed

    agreed = run_distributed(_decisions_on_rank, 2, args=(True,))
    assert agreed[0] == agreed[1]  # same cached steps and the same (reduced) statistic on every rank
    alone = run_distributed(_decisions_on_rank, 2, args=(False,))
    assert alone[0] != alone[1], "without the reduction each rank measures its own statistic"
    assert any(steps for steps, _ in agreed[0].values())


def test_user_calibrator_and_adapter_plug_in_without_touching_the_core():
    from cachedit.adapters import ADAPTERS, Adapter, register_adapter
    from cachedit.cache import CALIBRATORS, Calibrator, register_calibrator

    class Halved(Calibrator):
        """Forecast half the last residual (a deliberately odd policy, to see it used)."""

        def predict(self, step):
            return self.last * 0.5

    register_calibrator("halved", Halved)
    saved = ADAPTERS.get("FluxTransformer2DModel")
    register_adapter("FluxTransformer2DModel", Adapter("flux-single-only", ("single_transformer_blocks",)))
    try:
        pipe = tiny_pipeline("flux")
        cachedit.accelerate(pipe, **EXACT, cache=dict(residual_diff_threshold=ALWAYS, warmup_steps=2,
                                                      calibrator="halved"))
        _run(pipe, "flux")
        info = cachedit.summary(pipe)
        assert info["families"] == {"transformer": "flux-single-only"}
        stack = info["cache"]["transformer"]["stacks"]
        assert len(stack) == 1 and stack[0]["blocks"] == 2 and stack[0]["contexts"]["cond"]["cached_steps"]
        assert all(not hasattr(b, "_diffusers_hook") or "cachedit.cache" not in b._diffusers_hook.hooks
                   for b in pipe.transformer.transformer_blocks)
    finally:
        register_adapter("FluxTransformer2DModel", saved)
        CALIBRATORS.unregister("halved")
    with pytest.raises(ValueError, match="CacheConfig.calibrator='halved' is invalid; allowed values: None, "):
        cachedit.CacheConfig(calibrator="halved")


def test_rotary_embedding_is_memoized_within_a_call_and_exact():
    pipe = tiny_pipeline("flux")
    base = _run(pipe, "flux")
    cachedit.accelerate(pipe, **EXACT, cache=dict(residual_diff_threshold=0, warmup_steps=0))
    assert torch.equal(_run(pipe, "flux"), base)  # reuse of equal inputs' output changes nothing
    (module, hook), = cachedit.applied(pipe)["cache"].parts["transformer"].memo
    assert module is pipe.transformer.pos_embed and hook.hits >= 2 * STEPS - 2
    assert hook.last is None  # cleared by the pipeline's end-of-call reset
    cachedit.disable(pipe)
    assert not hasattr(pipe.transformer.pos_embed, "_diffusers_hook") or not pipe.transformer.pos_embed._diffusers_hook.hooks
