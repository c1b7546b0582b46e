"""The features `accelerate` applies, in the one order they are applied (and removed in reverse).

Hooks registered later wrap those registered before, so the order is the nesting, innermost first:
fused QKV before quantization (it quantizes the fused linears); the router before tensor parallelism
(its all-reduces run outside routing); compile before the cache (decisions stay out of the graphs);
the cache before the parallel plans (their splits are outermost, their reducer stages agree its
decisions); the pipeline-call scope last. Adding a feature: one module with a `Feature` subclass,
one entry here (docs/architecture.md).
"""

from __future__ import annotations

from .attention import Attention
from .base import Applied, Context, Feature, ReducerChain
from .cache import Cache
from .call_scope import CallScope
from .cfg_parallel import CfgParallel
from .compile import Compile
from .context_parallel import ContextParallel
from .controlnet_parallel import ControlNetParallel
from .fuse_qkv import FuseQKV
from .quantize import Quantize
from .signatures import Signatures
from .tensor_parallel import TensorParallel
from .vae_parallel import VaeParallel

FEATURES: tuple[Feature, ...] = (
    FuseQKV(),
    Quantize(),
    Attention(),
    Signatures(),  # processor objects, no hook: anywhere before compile
    TensorParallel(),  # transformers and text encoders
    Compile(),
    Cache(),
    ContextParallel(),
    CfgParallel(),
    VaeParallel(),  # components
    ControlNetParallel(),
    CallScope(),
)

__all__ = ["FEATURES", "Applied", "Context", "Feature", "ReducerChain"]
