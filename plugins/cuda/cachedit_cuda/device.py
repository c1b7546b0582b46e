"""What this process can see of NVIDIA hardware, asked without creating a CUDA context where possible.

`probe()` is the backend's availability probe (cheap: build flags, driver, device count). The
compute capabilities are asked only by the hooks that need them (kernel and quantization choice),
which run after the backend was chosen: `get_device_capability` initialises CUDA in the process.
"""

from __future__ import annotations

import os

import torch


def _visible() -> str:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "<unset>" if value is None else repr(value)


def probe() -> tuple[bool, str]:
    """Available when this torch build has CUDA, a driver answers, and a device is visible."""
    if torch.version.cuda is None:
        hip = getattr(torch.version, "hip", None)
        if hip:
            return False, f"torch {torch.__version__} is a ROCm (HIP {hip}) build; the cuda backend serves CUDA builds"
        return False, f"torch {torch.__version__} is a build without CUDA"
    if not torch.cuda.is_available():
        return False, (f"torch.cuda.is_available() is False: torch {torch.__version__} is built for CUDA "
                       f"{torch.version.cuda} but no NVIDIA driver answers or no device is visible "
                       f"(CUDA_VISIBLE_DEVICES={_visible()})")
    count = torch.cuda.device_count()
    if count < 1:
        return False, f"torch.cuda.device_count() is 0 (CUDA_VISIBLE_DEVICES={_visible()})"
    return True, ""


def device_capabilities() -> list[tuple[int, int]]:
    """Compute capability of every visible device, e.g. (9, 0) for Hopper; call only when available."""
    return [tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]


def all_in(caps: list[tuple[int, int]], low: tuple[int, int], high: tuple[int, int] = (99, 99)) -> bool:
    """Every visible device's capability within [low, high] (kernels must run on whichever device is used)."""
    return bool(caps) and all(low <= tuple(c) <= high for c in caps)


def describe(caps: list[tuple[int, int]]) -> str:
    return ", ".join(f"sm_{a}{b}" for a, b in caps) or "no device"
