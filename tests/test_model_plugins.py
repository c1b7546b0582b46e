"""A plugin ships support for a model family through `cachedit_register_models`: here an adapter and a
context-parallel plan for a transformer class cachedit has never heard of (FLUX.1's, under a new name).

Checked against the plain, never-accelerated pipeline: a never-skipping cache (threshold 0) on the
default attention path is the same code on the same inputs, so bitwise; a 2-rank Ulysses run matches
the one-process output within the context-parallel tests' tolerance.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

import cachedit
from cachedit.adapters import ADAPTERS, Adapter, adapter_for
from cachedit.parallel.plans import CPPlan, cp_plan_for
from cachedit.testing.distributed import run_distributed
from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

from .conftest import make_distribution, run_python

PROMPT = "a photo of a cat"
STEPS = 3
ATOL = 1e-5  # fp32 pipeline output, every rank against one process (as tests/test_context_parallel.py)
NEVER_SKIP = dict(Fn=1, Bn=0, residual_diff_threshold=0, warmup_steps=0)


class PluginFluxTransformer(FluxTransformer2DModel):
    """A transformer class no cachedit registry names."""


def _plugin_plan(transformer) -> CPPlan:
    return CPPlan(tuple(type(transformer)._cp_plan.items()), source="tiny-models plugin")


class ModelPlugin:
    @cachedit.hookimpl
    def cachedit_register_models(self, registry):
        registry.adapters.register("PluginFluxTransformer", Adapter(
            "plugin-flux", ("transformer_blocks", "single_transformer_blocks"), pure_modules=("pos_embed",)))
        registry.cp_plans.register("PluginFluxTransformer", _plugin_plan)


def _pipeline():
    pipe = tiny_pipeline("flux")
    pipe.transformer.__class__ = PluginFluxTransformer  # same weights and code, a name only the plugin knows
    return pipe


def _run(pipe):
    return pipe(prompt=PROMPT, **tiny_call_kwargs("flux", num_inference_steps=STEPS))[0]


def test_registered_plugin_ships_an_adapter_and_a_cp_plan(fresh_plugins):
    pipe = _pipeline()
    base = _run(pipe)
    assert adapter_for(pipe.transformer).family == "PluginFluxTransformer"  # the generic fallback
    assert cp_plan_for(pipe.transformer) is None
    fresh_plugins.register(ModelPlugin(), "tiny-models")
    assert ADAPTERS.owner("PluginFluxTransformer") == "tiny-models"
    assert cp_plan_for(pipe.transformer).source == "tiny-models plugin"

    cachedit.accelerate(pipe, device="cpu_ref", cache=NEVER_SKIP)
    assert torch.equal(_run(pipe), base)
    assert cachedit.summary(pipe)["families"] == {"transformer": "plugin-flux"}
    cachedit.disable(pipe)

    fresh_plugins.unregister("tiny-models")
    assert "PluginFluxTransformer" not in ADAPTERS and cp_plan_for(pipe.transformer) is None


def test_plugin_that_raises_in_register_models_is_recorded_and_its_models_forgotten(fresh_plugins):
    class Broken:
        @cachedit.hookimpl
        def cachedit_register_models(self, registry):
            registry.adapters.register("FluxTransformer2DModel", Adapter("broken", ("transformer_blocks",)))
            raise RuntimeError("model table corrupt")

    with pytest.warns(UserWarning, match="'broken-models' is ignored"):
        fresh_plugins.register(Broken(), "broken-models")
    assert "RuntimeError: model table corrupt" in fresh_plugins.failed["broken-models"]
    assert ADAPTERS.get("FluxTransformer2DModel").family == "flux"  # the entry it replaced serves again
    assert ADAPTERS.owner("FluxTransformer2DModel") is None


PLUGIN_SOURCE = """
import cachedit
from cachedit.adapters import Adapter
from cachedit.parallel.plans import diffusers_plan
from diffusers import FluxTransformer2DModel


class EntryPointFluxTransformer(FluxTransformer2DModel):
    pass


@cachedit.hookimpl
def cachedit_register_models(registry):
    registry.adapters.register("EntryPointFluxTransformer", Adapter(
        "entry-point-flux", ("transformer_blocks", "single_transformer_blocks"), pure_modules=("pos_embed",)))
    registry.cp_plans.register("EntryPointFluxTransformer", diffusers_plan())
"""


def test_entry_point_plugin_ships_model_support(tmp_path):
    site = make_distribution(tmp_path, "tiny-models", {"tiny_models": PLUGIN_SOURCE}, {"tiny-models": "tiny_models"})
    code = f"""
    import torch, cachedit
    from cachedit.adapters import ADAPTERS, adapter_for
    from cachedit.parallel.plans import cp_plan_for
    from cachedit.testing.tiny import tiny_pipeline, tiny_call_kwargs
    import tiny_models
    torch.set_num_threads(1)
    pipe = tiny_pipeline("flux")
    pipe.transformer.__class__ = tiny_models.EntryPointFluxTransformer
    family = adapter_for(pipe.transformer).family  # the first lookup loads the plugins
    run = lambda: pipe(prompt="{PROMPT}", **tiny_call_kwargs("flux", num_inference_steps={STEPS}))[0]
    base = run()  # plain
    cachedit.accelerate(pipe, device="cpu_ref", cache={NEVER_SKIP!r})
    out = run()
    print(family, ADAPTERS.owner("EntryPointFluxTransformer"), cp_plan_for(pipe.transformer).source,
          cachedit.summary(pipe)["families"]["transformer"], torch.equal(out, base))
    """
    proc = run_python(code, site)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "entry-point-flux tiny-models diffusers entry-point-flux True"


def _rank_ulysses(rank, world):
    """On each rank: without the plugin, no plan; with it, Ulysses over the plugin's plan."""
    pipe = _pipeline()
    try:
        cachedit.accelerate(pipe, device="cpu_ref", parallel=dict(ulysses=world))
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    cachedit.plugins.manager().register(ModelPlugin(), "tiny-models")
    cachedit.accelerate(pipe, device="cpu_ref", parallel=dict(ulysses=world))
    source = cachedit.applied(pipe)["context_parallel"].parts["transformer"].plan.source
    return dict(refused=refused, source=source, images=_run(pipe))


def test_two_rank_ulysses_runs_on_the_plugins_cp_plan():
    reference = _run(_pipeline())  # plain, one process
    for result in run_distributed(_rank_ulysses, 2):
        assert "no context-parallel plan for pipe.transformer (PluginFluxTransformer)" in result["refused"]
        assert result["source"] == "tiny-models plugin"
        torch.testing.assert_close(result["images"], reference, atol=ATOL, rtol=0)
