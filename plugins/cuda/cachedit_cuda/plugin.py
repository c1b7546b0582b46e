"""The cuda plugin: declares the backend and probes the hardware without initialising it.

Kernels (FlashAttention-3, cuDNN SDPA, FP8 linears) arrive with the accelerator-backends issue;
until then the core's torch SDPA fallback serves attention and NCCL goes through the core's
torch.distributed communicator.
"""

from __future__ import annotations

import torch

from cachedit import Backend, hookimpl

NAME = "cuda"


def probe() -> tuple[bool, str]:
    """Available when this torch build has CUDA, a driver answers, and a device exists."""
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a build without CUDA"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False (no NVIDIA driver or no visible device)"
    count = torch.cuda.device_count()
    if count < 1:
        return False, "torch.cuda.device_count() is 0"
    return True, ""


def device_capabilities() -> list[tuple[int, int]]:
    """Compute capability of every visible device, e.g. (9, 0) for Hopper; call only when available."""
    return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]


@hookimpl
def cachedit_register_backends(registry):
    registry.add(Backend(name=NAME, device_type="cuda", dist_backend="nccl", priority=100, is_available=probe,
                         description="NVIDIA GPUs (NCCL)"))


@hookimpl
def cachedit_compile_options(backend, target):
    if backend.name != NAME:
        return None
    return {"backend": "inductor"}
