"""Fit the per-model data that TeaCache and MagCache need, from a few uncached runs.

    options = calibrate(pipe, "teacache", runs)   # {"coefficients": [...]}: rescaling polynomial, degree 4
    options = calibrate(pipe, "magcache", runs)   # {"mag_ratios": [...]}: one ratio per step

`runs` is a list of pipeline-call keyword dicts (prompt, steps, seed ...). Nothing is patched:
plain forward hooks on the first and last block of the transformer's first stack record each
step's input, timestep-modulated input and output; CFG branches are kept apart by the order of
the transformer's calls at each timestep (`runs.py`), never by tensor addresses.
"""

from __future__ import annotations

import inspect

import torch

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


def calibrate(pipe, policy: str, runs: list[dict]) -> dict:
    """`policy`'s options fitted from uncached `runs` (its `fit`); ValueError for a policy that needs none."""
    allowed = calibrated_policies()
    if policy not in allowed:
        raise ValueError(f"calibrate: policy={policy!r} needs no calibration or is unknown; allowed values: "
                         f"{', '.join(repr(p) for p in allowed)}")
    return POLICIES.get(policy).fit(record(pipe, runs))
