"""The ascend plugin: declares the backend; `torch_npu` is imported only by the probe.

Importing torch_npu registers the "npu" device type with torch, and without the CANN toolkit
it fails (e.g. "libhccl.so: cannot open shared object file"); that error is the reason shown.
Kernels (npu_fusion_attention, int8 matmul) arrive with the accelerator-backends issue.
"""

from __future__ import annotations

import importlib

from cachedit import Backend, hookimpl

NAME = "ascend"


def probe() -> tuple[bool, str]:
    """Available when torch_npu imports and reports at least one NPU."""
    try:
        torch_npu = importlib.import_module("torch_npu")
    except ModuleNotFoundError:
        return False, "torch_npu is not installed (pip install torch-npu matching your torch, plus the CANN toolkit)"
    except Exception as exc:  # ImportError of CANN libraries, or anything the vendor import raises
        return False, f"import torch_npu failed: {type(exc).__name__}: {exc}"
    npu = getattr(torch_npu, "npu", None)
    if npu is None or not npu.is_available():
        return False, "torch_npu.npu.is_available() is False (no NPU visible; check ASCEND_RT_VISIBLE_DEVICES)"
    if npu.device_count() < 1:
        return False, "torch_npu.npu.device_count() is 0"
    return True, ""


@hookimpl
def cachedit_register_backends(registry):
    registry.add(Backend(name=NAME, device_type="npu", dist_backend="hccl", priority=90, is_available=probe,
                         description="Huawei Ascend NPUs (HCCL, torch_npu)"))
