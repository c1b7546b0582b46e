"""Built-in hook implementations, all `trylast`, so any plugin can override them."""

from __future__ import annotations

from .attention import TORCH_SDPA
from .hookspecs import hookimpl
from .parallel.communicator import Communicator


@hookimpl(trylast=True)
def cachedit_attention_kernels(backend):
    """torch's SDPA runs on every device type: the lowest-priority fallback kernel."""
    return [TORCH_SDPA]


@hookimpl(trylast=True)
def cachedit_communicator(backend, group):
    """Plain torch.distributed collectives over the backend's process group."""
    return Communicator(group)


@hookimpl(trylast=True)
def cachedit_compile_options(backend, target):
    return {"fullgraph": target.config.fullgraph, "dynamic": target.config.dynamic, "fuse_qkv": False}
