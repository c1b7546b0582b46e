"""Fit the per-model data that TeaCache and MagCache need, from a few uncached runs.

    options = calibrate(pipe, "teacache", runs)   # {"coefficients": [...]}: rescaling polynomial, degree 4
    options = calibrate(pipe, "magcache", runs)   # {"mag_ratios": [...]}: one ratio per step
    options = calibrate(pipe, "schedule", runs, speedup=3)  # {"steps": {context: [...]}, "num_steps": N}

`runs` is a list of pipeline-call keyword dicts (prompt, steps, seed ...). Nothing is patched:
plain forward hooks on the first and last block of the transformer's first stack record each
step's input, timestep-modulated input and output; CFG branches are kept apart by the order of
the transformer's calls at each timestep (`runs.py`), never by tensor addresses. `record_streams`
records every stack's full residuals per cache context, by the name the pipeline gives it.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.hooks import ModelHook

from .. import hooks
from .._diffusers_compat import BaseState, StateManager, current_context, mark_stateful
from ..adapters import adapter_for, block_io, modulated_input
from .policies import POLICIES, calibrated_policies, mag_ratios, teacache_coefficients  # noqa: F401 - re-exported
from .runs import RunTracker


def record(pipe, runs: list[dict]) -> list[list[dict]]:
    """Per run and CFG branch, the list of steps: {"input", "modulated", "output"} tensors."""
    transformer = pipe.transformer
    blocks = adapter_for(transformer).stacks(transformer)[0]
    io_first, io_last = block_io(blocks[0]), block_io(blocks[-1])
    branch, step = {}, {}

    params = [p for p in inspect.signature(transformer.forward).parameters]
    at = next((params.index(p) for p in ("timestep", "t") if p in params), None)

    def on_call(module, args, kwargs):
        timestep = kwargs.get(params[at]) if at is not None else None
        if timestep is None and at is not None and at < len(args):
            timestep = args[at]
        value = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep or 0)
        branch["key"] = tracker.observe(value, None)[0]  # the call's order at its timestep: cond, then uncond

    def on_first(module, args, kwargs):
        step["input"] = io_first.inputs(module, args, kwargs)[0].detach().clone()
        mod = modulated_input(module, args, kwargs)
        step["modulated"] = mod.detach().clone() if mod is not None else step["input"]

    def on_last(module, args, kwargs, output):
        step["output"] = io_last.outputs(output)[0].detach().clone()
        branches.setdefault(branch["key"], []).append(dict(step))

    handles = [transformer.register_forward_pre_hook(on_call, with_kwargs=True),
               blocks[0].register_forward_pre_hook(on_first, with_kwargs=True),
               blocks[-1].register_forward_hook(on_last, with_kwargs=True)]
    recorded = []
    try:
        for kwargs in runs:
            branches: dict = {}
            tracker = RunTracker()
            with torch.no_grad():
                pipe(**kwargs)
            recorded.extend(branches.values())
    finally:
        for h in handles:
            h.remove()
    return recorded


class _ContextName(ModelHook):
    """Reads the name a pipeline gives a transformer call with `cache_context`: diffusers sets it on the
    state managers of stateful hooks, so this hook holds one and never changes the call."""

    def __init__(self) -> None:
        super().__init__()
        mark_stateful(self)
        self.states = StateManager(BaseState)

    @property
    def name(self) -> str | None:
        context = current_context(self.states)
        return context.name if context is not None else None

    def reset_state(self, module):
        self.states.reset()
        return module


def _timestep_reader(transformer):
    params = list(inspect.signature(transformer.forward).parameters)
    at = next((params.index(p) for p in ("timestep", "t") if p in params), None)

    def read(args, kwargs) -> float:
        timestep = kwargs.get(params[at]) if at is not None else None
        if timestep is None and at is not None and at < len(args):
            timestep = args[at]
        return float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep or 0)
    return read


def record_streams(pipe, runs: list[dict]) -> list[dict[str, dict]]:
    """Per run, per cache context (the pipeline's `cache_context` name, else "branch0", "branch1" by call order
    as cachedit names them): {"timesteps": [float per step], "residuals": [[tensor per stream] per step]}, where
    the streams are each block stack's full hidden residual (last block's output - first block's input) and its
    text-stream residual where the blocks return one: what a skipped step of an Fn=0, Bn=0 cache forecasts."""
    transformer = pipe.transformer
    stacks = adapter_for(transformer).stacks(transformer)
    read_timestep = _timestep_reader(transformer)
    names = _ContextName()
    call: dict = {}

    def on_call(module, args, kwargs):
        timestep = read_timestep(args, kwargs)
        branch = tracker.observe(timestep, names.name)[0]
        call.update(context=names.name or branch, timestep=timestep, streams=[])

    def on_first(io, module, args, kwargs):
        call["inputs"] = io.inputs(module, args, kwargs)

    def on_last(io, module, args, kwargs, output):
        (h_in, e_in), (h_out, e_out) = call.pop("inputs"), io.outputs(output)
        call["streams"].append((h_out - h_in).detach().float().clone())
        if e_in is not None and e_out is not None and e_in.shape == e_out.shape:
            call["streams"].append((e_out - e_in).detach().float().clone())

    def on_done(module, args, kwargs, output):
        entry = contexts.setdefault(call["context"], {"timesteps": [], "residuals": []})
        entry["timesteps"].append(call["timestep"])
        entry["residuals"].append(call["streams"])

    handles = [transformer.register_forward_pre_hook(on_call, with_kwargs=True),
               transformer.register_forward_hook(on_done, with_kwargs=True)]
    for blocks in stacks:
        first, last = block_io(blocks[0]), block_io(blocks[-1])
        handles.append(blocks[0].register_forward_pre_hook(lambda m, a, k, io=first: on_first(io, m, a, k),
                                                           with_kwargs=True))
        handles.append(blocks[-1].register_forward_hook(lambda m, a, k, o, io=last: on_last(io, m, a, k, o),
                                                        with_kwargs=True))
    hooks.attach(transformer, names, "cachedit.calibrate.context")
    recorded = []
    try:
        for kwargs in runs:
            contexts: dict = {}
            tracker = RunTracker()
            with torch.no_grad():
                pipe(**kwargs)
            recorded.append(contexts)
    finally:
        for h in handles:
            h.remove()
        hooks.detach(transformer, "cachedit.calibrate.context")
    return recorded


def calibrate(pipe, policy: str, runs: list[dict], **options) -> dict:
    """`policy`'s options from uncached `runs`: a policy's `fit` of the recorded steps, or for "schedule" the
    searched computed steps (`options` go to `schedule_search.ScheduleSearch`: speedup=, calibrator=,
    objective=, split=, weights=). ValueError for a policy that needs none."""
    allowed = [*calibrated_policies(), "schedule"]
    if policy not in allowed:
        raise ValueError(f"calibrate: policy={policy!r} needs no calibration or is unknown; allowed values: "
                         f"{', '.join(repr(p) for p in allowed)}")
    if policy == "schedule":
        from .schedule_search import ScheduleSearch

        search_keys = ("calibrator", "order", "objective")
        search = ScheduleSearch(record_streams(pipe, runs), **{k: options.pop(k) for k in search_keys if k in options})
        return search.options(**options)
    if options:
        raise ValueError(f"calibrate: policy={policy!r} takes no options, got {sorted(options)}")
    return POLICIES.get(policy).fit(record(pipe, runs))
