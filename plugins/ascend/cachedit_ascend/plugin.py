"""The ascend plugin's hook implementations. `torch_npu` is imported only inside the probe and the hooks.

Importing torch_npu registers the "npu" device type with torch, and without the CANN toolkit it
fails (e.g. "libhccl.so: cannot open shared object file"); that error is the reason shown.
Device selection: ASCEND_RT_VISIBLE_DEVICES lists the NPU ids this process may see (ascending,
comma-separated; an empty value hides them all), like CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os

from cachedit import Backend, hookimpl
from cachedit.parallel.communicator import Communicator

NAME = "ascend"
VISIBLE_ENV = "ASCEND_RT_VISIBLE_DEVICES"


def _visible() -> str:
    value = os.environ.get(VISIBLE_ENV)
    return f"{VISIBLE_ENV}=" + ("<unset>: all NPUs visible" if value is None else repr(value))


def _torch_npu():
    return importlib.import_module("torch_npu")


def probe() -> tuple[bool, str]:
    """Available when torch_npu imports and reports at least one NPU."""
    try:
        torch_npu = _torch_npu()
    except ModuleNotFoundError:
        return False, "torch_npu is not installed (pip install torch-npu matching your torch, plus the CANN toolkit)"
    except Exception as exc:  # ImportError of CANN libraries, or anything the vendor import raises
        return False, (f"import torch_npu failed: {type(exc).__name__}: {exc} (install the CANN toolkit and "
                       "source its set_env.sh)")
    npu = getattr(torch_npu, "npu", None)
    if npu is None or not npu.is_available():
        return False, (f"torch_npu.npu.is_available() is False: no NPU visible ({_visible()}; it lists the NPU "
                       "ids this process sees, ascending and comma-separated; check the driver with npu-smi info)")
    if npu.device_count() < 1:
        return False, f"torch_npu.npu.device_count() is 0 ({_visible()})"
    return True, ""


def device_name() -> str:
    """The NPU's SoC name (e.g. Ascend910B3); "" when torch_npu cannot tell."""
    try:
        return str(_torch_npu().npu.get_device_name(0))
    except Exception:
        return ""


def _dynamo_backends() -> set[str]:
    names = {ep.name for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")}
    try:
        from torch._dynamo.backends.registry import _COMPILER_FNS

        names |= set(_COMPILER_FNS)
    except Exception:
        pass
    return names


def compile_backend(mode: str | None) -> tuple[str | None, str]:
    """torch_npu's dynamo backend for `mode`: "npu" (torchair, GE graph) by default, "npugraph_ex"
    (captured graphs, the NPU's CUDA graphs) for mode="reduce-overhead"; (None, reason) when missing."""
    wanted = "npugraph_ex" if mode == "reduce-overhead" else "npu"
    registered = _dynamo_backends()
    if wanted in registered:
        return wanted, ""
    if wanted != "npu" and "npu" in registered:
        return "npu", f"torch_npu registers no {wanted!r} dynamo backend; using 'npu'"
    return None, "torch_npu registers no 'npu' dynamo backend (torchair missing); torch.compile's default applies"


@hookimpl
def cachedit_register_backends(registry):
    registry.add(Backend(name=NAME, device_type="npu", dist_backend="hccl", priority=90, is_available=probe,
                         description="Huawei Ascend NPUs (HCCL, npu_fused_infer_attention_score, W8A8 int8, torchair)"))


@hookimpl
def cachedit_attention_kernels(backend):
    if not probe()[0]:
        return None
    from .attention import infer_attention_kernel
    from .device import is_atlas_a2_a3

    if not is_atlas_a2_a3(device_name()):
        return []  # npu_fused_infer_attention_score is documented for Atlas A2/A3 only
    fn = getattr(_torch_npu(), "npu_fused_infer_attention_score", None)
    return [] if fn is None else [infer_attention_kernel(fn)]


@hookimpl
def cachedit_communicator(backend, group):
    """HCCL takes the core's collectives as they are (float8 exchanged as bytes)."""
    return Communicator(group)


@hookimpl
def cachedit_quantized_linear(backend, spec):
    if not probe()[0]:
        return None
    from .quant import path_for

    return path_for(spec, _torch_npu(), device_name())


@hookimpl
def cachedit_compile_options(backend, target):
    cfg = target.config
    options = {"dynamic": False if cfg.dynamic is None else cfg.dynamic, "fuse_qkv": True}  # one q/k/v GEMM
    name, _ = compile_backend(cfg.mode)
    if name is not None:
        options["backend"] = name
    return options
