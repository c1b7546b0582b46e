"""The cpu_ref plugin's hook implementations."""

from __future__ import annotations

import torch

from cachedit import AttentionKernel, Backend, hookimpl

from .attention import math_attention
from .communicator import GlooCommunicator
from .quant import path_for

NAME = "cpu_ref"


def _is_available() -> tuple[bool, str]:
    import torch.distributed as dist

    if not dist.is_available():
        return False, "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return False, "torch.distributed has no gloo backend in this torch build"
    return True, ""


@hookimpl
def cachedit_register_backends(registry):
    registry.add(Backend(name=NAME, device_type="cpu", dist_backend="gloo", priority=0,
                         is_available=_is_available, description="exact CPU reference (gloo, math attention)"))


@hookimpl
def cachedit_attention_kernels(backend):
    return [AttentionKernel(
        name="math", fn=math_attention, dtypes=frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16}),
        returns_lse=True, supports_mask=True, supports_causal=True, supports_gqa=True, priority=-200, exact=True,
        # Below torch_sdpa: it serves only calls SDPA cannot (the LSE Ring attention merges) or when named,
        # so by default a CPU pipeline keeps its own SDPA calls, bit for bit.
        description="softmax(QK^T)V in float32 with log-sum-exp",
    )]


@hookimpl
def cachedit_communicator(backend, group):
    return GlooCommunicator(group)


@hookimpl
def cachedit_quantized_linear(backend, spec):
    return path_for(spec)


@hookimpl
def cachedit_compile_options(backend, target):
    # CPU inductor: C++/OpenMP codegen. Static shapes: a pipeline's shapes are fixed per call.
    return {"backend": "inductor", "dynamic": False if target.config.dynamic is None else target.config.dynamic}
