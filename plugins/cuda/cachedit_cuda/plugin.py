"""The cuda plugin's hook implementations.

Importing this module touches no GPU and imports no vendor extension: the availability probe asks
only the build, the driver and the device count; compute capabilities, FlashAttention-3
(`flash_attn_interface`) and cuDNN are asked for when a hook needs them, i.e. after `accelerate`
chose this backend.
"""

from __future__ import annotations

from cachedit import Backend, hookimpl

from . import ao, attention, quant
from .communicator import NcclCommunicator
from .device import device_capabilities, probe

NAME = "cuda"

# Inductor settings for DiT blocks: the flags diffusers' documentation sets for its pipelines under
# torch.compile (1x1 convolutions as matmuls, coordinate-descent tuning of the generated Triton
# kernels checking every direction, no epilogue fusion). CUDA graphs only when the user asks for
# them with mode="reduce-overhead" (torch.compile then takes the mode instead of these options).
DIT_INDUCTOR_OPTIONS = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "epilogue_fusion": False,
    "triton.cudagraphs": False,
}

__all__ = ["NAME", "probe", "device_capabilities", "kernel_report", "DIT_INDUCTOR_OPTIONS"]


def kernel_report() -> dict:
    """What this machine offers: capabilities, kernels, why the others are left out, quant paths."""
    ok, reason = probe()
    if not ok:
        return {"available": False, "reason": reason}
    from cachedit.quant.spec import QuantSpec

    caps = device_capabilities()
    kernels, skipped = attention.offered_kernels(caps)
    specs = [QuantSpec(s, g, w) for s in ("fp8", "int8") for g in ("tensor", "row") for w in (False, True)]
    return {
        "available": True, "capabilities": caps,
        "kernels": [k.name for k in kernels], "skipped_kernels": skipped,
        "quant": {f"{s.scheme}/{s.granularity}{'/weight_only' if s.weight_only else ''}":
                  quant.unsupported(s, caps) or quant.path_for(s, caps).name for s in specs},
        "torchao": quant.torchao_version(), "torchao_path": ao.usable() or "used for every offered scheme",
    }


@hookimpl
def cachedit_register_backends(registry):
    registry.add(Backend(name=NAME, device_type="cuda", dist_backend="nccl", priority=100, is_available=probe,
                         description="NVIDIA GPUs (NCCL, FlashAttention-3 / cuDNN / flash SDPA, FP8 and INT8 GEMMs)"))


@hookimpl
def cachedit_attention_kernels(backend):
    if not probe()[0]:
        return []
    return attention.offered_kernels(device_capabilities())[0]


@hookimpl
def cachedit_communicator(backend, group):
    return NcclCommunicator(group)


@hookimpl
def cachedit_quantized_linear(backend, spec):
    if not probe()[0]:
        return None
    return quant.path_for(spec, device_capabilities())


@hookimpl
def cachedit_compile_options(backend, target):
    cfg = target.config
    # fuse_qkv: one q/k/v GEMM per attention where the model supports it (fewer, larger GEMMs)
    options = {"backend": "inductor", "dynamic": False if cfg.dynamic is None else cfg.dynamic, "fuse_qkv": True}
    if cfg.mode is None and cfg.backend in (None, "inductor"):  # a mode replaces these options
        options["options"] = dict(DIT_INDUCTOR_OPTIONS)
    return options
