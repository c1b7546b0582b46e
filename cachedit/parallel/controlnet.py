"""ControlNet parallelism: the ControlNet sharded the way the transformer is, so its residuals come
out in the layout the transformer adds them to.

Context parallelism: the transformer adds the residuals to its own sequence shard, so they must be
split the way its image tokens are.
- `ParallelConfig.controlnet=True`: the ControlNet gets the transformer's context-parallel plan
  (`apply_context_parallel` with the plan registered here): its image, control and text tokens and
  their position ids are split like the transformer's, its attention goes through the same Ulysses /
  Ring exchange, and its residuals are never gathered: each rank holds exactly the rows of its own
  image tokens, 1/world of the ControlNet's work.
- `controlnet=False`: the ControlNet runs whole on every rank and the transformer splits the
  residuals at its entry, like its hidden states.
Either way a hook on each context-parallel transformer checks the residuals' length and splits
them when they are whole, so a mismatch is a clear error, never a silent broadcast.

Tensor parallelism (tensor > 1): the transformer's hidden states are whole on every tensor rank, so
its residuals must be too. `controlnet=True` shards the ControlNet's blocks over the transformer's
tensor group with FLUX.1's plan (`tp_plans.py`); each block ends in an all-reduce, so the residuals
come out whole: 1/tensor of the block weights and work per rank. `controlnet=False` runs it whole on
every rank. With a hybrid mesh the ControlNet gets both, each over its own group of the mesh.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import zip_longest

import torch.nn as nn
from diffusers.hooks import ModelHook

from .. import hooks
from ..attention import AttentionRouter
from ..routing import route, unroute
from .context import apply_context_parallel, check_context_parallel, cp_mode, remove_context_parallel
from .metering import MeteredCommunicator
from .plans import CP_PLANS, CPPlan, ContextParallelInput
from .tensor import apply_tensor_parallel, check_module, remove_tensor_parallel
from .tp_plans import tp_plan_for
from .ulysses import split_sizes

RESIDUAL_HOOK = "cachedit.controlnet.residuals"
RESIDUALS = ("controlnet_block_samples", "controlnet_single_block_samples")  # (batch, image tokens, dim) each
SUPPORTED_CONTROLNETS = ("FluxControlNetModel",)  # alone or inside a FluxMultiControlNetModel


def _flux_controlnet_plan(controlnet: nn.Module) -> CPPlan:
    """As FluxTransformer2DModel's `_cp_plan` at the entry, plus the control tokens; no gather."""
    seq, ids = ContextParallelInput(split_dim=1, expected_dims=3), ContextParallelInput(split_dim=0, expected_dims=2)
    return CPPlan(((("", {"hidden_states": seq, "controlnet_cond": seq, "encoder_hidden_states": seq,
                          "img_ids": ids, "txt_ids": ids})),))


CP_PLANS.register("FluxControlNetModel", _flux_controlnet_plan)


def _nets(controlnet: nn.Module) -> list[nn.Module]:
    nets = getattr(controlnet, "nets", None)  # Flux / SD3 multi-ControlNet wrappers
    return list(nets) if isinstance(nets, nn.ModuleList) else [controlnet]


def check_controlnet_parallel(pipe, config, kernels, attention) -> None:
    """Every check that can fail before the ControlNet is hooked (ValueError)."""
    if not config.controlnet:
        return
    context = cp_mode(config) is not None
    if not context and config.tensor == 1:
        raise ValueError("ParallelConfig.controlnet=True gives the ControlNet the transformer's context- or tensor-"
                         "parallel plan; allowed: True only with ulysses > 1, ring > 1 or tensor > 1 (got "
                         f"ulysses={config.ulysses}, ring={config.ring}, tensor={config.tensor})")
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is None:
        raise ValueError(f"ParallelConfig.controlnet=True: pipe ({type(pipe).__name__}) has no `controlnet`; "
                         "allowed: False for pipelines without one")
    nets = _nets(controlnet)
    for i, net in enumerate(nets):
        where = "pipe.controlnet" + (f".nets[{i}]" if net is not controlnet else "")
        if type(net).__name__ not in SUPPORTED_CONTROLNETS:
            raise ValueError(f"ParallelConfig.controlnet=True: {where} is {type(net).__name__}; supported: "
                             f"{', '.join(SUPPORTED_CONTROLNETS)} (or controlnet=False: it runs whole on every rank)")
        if context and (getattr(net, "union", False) or getattr(net, "input_hint_block", None) is not None):
            raise ValueError(f"ParallelConfig.controlnet=True: {where} is a union (mode-token) or image-hint "
                             "ControlNet, whose extra inputs don't split with the sequence; use controlnet=False")
        if config.tensor > 1:
            check_module(net, config.tensor, where, f"ParallelConfig.tensor={config.tensor} with controlnet=True")
    if context:
        check_context_parallel({f"controlnet.nets[{i}]" if len(nets) > 1 else "controlnet": net
                                for i, net in enumerate(nets)}, config, kernels, attention)


class ResidualSplitHook(ModelHook):
    """Outermost on a context-parallel transformer: ControlNet residuals as long as the whole image
    are split like the hidden states; residuals already split (controlnet=True) must be this rank's length."""

    def __init__(self, state, presplit: bool) -> None:
        super().__init__()
        self.state, self.presplit = state, presplit

    def pre_forward(self, module, *args, **kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        for name in RESIDUALS:
            if kwargs.get(name) is not None:
                kwargs[name] = [self._split(s, hidden.shape[1], name) for s in kwargs[name]]
        return args, kwargs

    def _split(self, sample, tokens: int, name: str):
        state = self.state
        mine = split_sizes(tokens, state.world_size)[state.rank]
        want = mine if self.presplit else tokens
        if sample.shape[1] != want:
            share = "this rank's share" if self.presplit else "all"
            raise ValueError(f"context parallelism: {name} has {sample.shape[1]} tokens on dim 1, expected {want} "
                             f"({share} of the transformer's {tokens} image tokens)")
        return sample if self.presplit else state.shard(sample, 1, f"{name} of the transformer")


@dataclass
class ControlNetParallel:
    """What `apply_controlnet_parallel` changed, so removal undoes exactly that."""

    context_parallel: list = field(default_factory=list)  # parallel.context.ContextParallel per net
    tensor_parallel: list = field(default_factory=list)  # parallel.tensor.TensorParallel per net
    routers: list = field(default_factory=list)
    attention: list = field(default_factory=list)  # modules routed through a router
    residuals: list = field(default_factory=list)  # transformers carrying the ResidualSplitHook

    def stats(self) -> list[dict]:
        """Per net: bytes sent and calls per mesh dimension ("tensor": its tensor-parallel group)."""
        return [{**(cp.stats() if cp else {}), **({"tensor": tp.stats()} if tp else {})}
                for cp, tp in zip_longest(self.context_parallel, self.tensor_parallel)]


def apply_controlnet_parallel(pipe, config, kernels, attention, context_parallel: dict, communicator,
                              mesh=None, device_type: str = "cpu") -> ControlNetParallel:
    """Hook `pipe.controlnet` (controlnet=True) and every context-parallel transformer of `pipe`
    (`context_parallel`: transformer name -> ContextParallel) for ControlNet residuals; `communicator(group)`
    makes a communicator over a process group; `mesh` is the transformer's hybrid mesh when it has one."""
    applied = ControlNetParallel()
    try:
        context = cp_mode(config) is not None
        if config.controlnet:
            for net in _nets(pipe.controlnet):
                if context:
                    router = AttentionRouter(kernels, attention)
                    applied.attention.extend(route(net, router))
                    applied.routers.append(router)
                if config.tensor > 1:  # after the router, as on the transformer: reduces outside routing
                    group = mesh.get_group("tensor") if mesh is not None else None
                    applied.tensor_parallel.append(
                        apply_tensor_parallel(net, tp_plan_for(net), MeteredCommunicator(communicator(group))))
                if context:
                    applied.context_parallel.append(
                        apply_context_parallel(net, config, communicator, router, mesh=mesh, device_type=device_type))
        for name, cp in context_parallel.items():
            transformer = getattr(pipe, name)
            hooks.attach(transformer, ResidualSplitHook(cp.state, config.controlnet), RESIDUAL_HOOK)
            applied.residuals.append(transformer)
    except BaseException:
        remove_controlnet_parallel(applied)
        raise
    return applied


def remove_controlnet_parallel(applied: ControlNetParallel) -> None:
    """Undo `apply_controlnet_parallel` exactly, in reverse order."""
    for transformer in reversed(applied.residuals):
        hooks.detach(transformer, RESIDUAL_HOOK)
    for cp in reversed(applied.context_parallel):
        remove_context_parallel(cp)
    for tp in reversed(applied.tensor_parallel):
        remove_tensor_parallel(tp)
    unroute(applied.attention)
    applied.residuals.clear()
    applied.context_parallel.clear()
    applied.tensor_parallel.clear()
    applied.attention.clear()
