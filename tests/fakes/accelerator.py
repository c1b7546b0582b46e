"""A stand-in accelerator on a CPU: tensors that say they live on the `meta` device but hold real CPU data.

On cpu_ref host and device are the same, so code that builds a tensor on the host and hands it to a
device op cannot fail there; on a GPU or NPU it crashes ("Expected all tensors to be on the same
device") or NCCL/HCCL reject it. Inside `accelerator()`:

- every factory call with `device="meta"` and every `.to("meta")` gives an `OnAccelerator` tensor
  (its device reads `meta`, its data is a real CPU tensor, so values, `.item()` and `.tolist()` work);
- every op checks its tensor arguments the way CUDA does: all on one device, except 0-dim host
  tensors (CUDA accepts CPU scalars) and the ops that move data between devices (copies, and
  indexing with host indices);
- every collective (`c10d` op, e.g. what `dist.all_gather` runs over gloo) checks that *every* tensor
  is on the accelerator, as NCCL and HCCL do, then runs on the real CPU tensors.

A mismatch raises `PlacementError` naming the op and the devices.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")


class PlacementError(RuntimeError):
    """A host tensor met an accelerator tensor (what a GPU/NPU run would fail on)."""


class OnAccelerator(torch.Tensor):
    """A real CPU tensor that reports the stand-in accelerator as its device."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls, inner.size(), strides=inner.stride(), storage_offset=inner.storage_offset(), dtype=inner.dtype,
            layout=inner.layout, device=DEVICE, requires_grad=inner.requires_grad)
        wrapper.inner = inner
        return wrapper

    def __repr__(self) -> str:
        return f"OnAccelerator({self.inner!r})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.untyped_storage):
            return func(*tree_map(_unwrap, args), **kwargs)  # a device tensor's values, read on the host
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise PlacementError(f"{func}: an accelerator tensor outside `accelerator()`")


def _unwrap(t):
    return t.inner if isinstance(t, OnAccelerator) else t


def _is_accel_device(device) -> bool:
    return device is not None and torch.device(device).type == DEVICE.type


# Ops that legitimately take tensors on two devices.
_CROSS_DEVICE = {"aten::copy_", "aten::_to_copy", "aten::_copy_from", "aten::_copy_from_and_resize",
                 "aten::index.Tensor", "aten::index_put_", "aten::index_put", "aten::_index_put_impl_",
                 "aten::set_.source_Storage_storage_offset"}


class _FromData(TorchFunctionMode):
    """`torch.tensor(data, device=...)` copies host data to the device below the dispatcher's Python modes;
    build it on the host and move it with a dispatched `.to()` instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and _is_accel_device(kwargs.get("device")):
            return func(*args, **{**kwargs, "device": "cpu"}).to(DEVICE)
        return func(*args, **kwargs)


class _Mode(TorchDispatchMode):
    def __init__(self, log: list) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name + ("." + func._overloadname if func._overloadname != "default" else "")
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_accel = [isinstance(t, OnAccelerator) for t in tensors]
        if any(t.device == DEVICE and not a for t, a in zip(tensors, on_accel)):
            raise PlacementError(f"{name}: got a real {DEVICE} tensor (no data); the harness missed its factory")
        if func.namespace == "c10d":
            if tensors and not all(on_accel):
                host = [tuple(t.shape) for t, a in zip(tensors, on_accel) if not a]
                raise PlacementError(f"{name}: a collective of the accelerator's group got host tensors of shapes "
                                     f"{host} (NCCL/HCCL take device tensors only)")
            self.log.append(name)
        elif any(on_accel) and name not in _CROSS_DEVICE and func._schema.name not in _CROSS_DEVICE:
            host = [tuple(t.shape) for t, a in zip(tensors, on_accel) if not a and t.dim() > 0]
            if host:
                raise PlacementError(f"{name}: expected all tensors on one device, found {DEVICE} and host "
                                     f"tensors of shapes {host}")
        to_accel = _is_accel_device(kwargs.get("device"))
        leaves_host = func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None and not to_accel
        if to_accel:
            kwargs = {**kwargs, "device": torch.device("cpu")}
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if not (to_accel or (any(on_accel) and not leaves_host)):
            return out
        inputs = [t for t in tensors if isinstance(t, OnAccelerator)]

        def wrap(t):
            if not isinstance(t, torch.Tensor) or isinstance(t, OnAccelerator):
                return t
            for w in inputs:  # in-place ops return their input: give back the same accelerator tensor
                if w.inner is t:
                    return w
            return OnAccelerator(t)

        return tree_map(wrap, out)


@contextlib.contextmanager
def accelerator():
    """Inside: `device="meta"` means the stand-in accelerator; yields the list of collectives it ran."""
    log: list[str] = []
    # `module.to(device)` keeps each Parameter object and moves its data, as it does between real devices
    # (where it assigns `param.data`); a tensor subclass needs the swap to behave alike.
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with _FromData(), _Mode(log):
            yield log
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


def to_host(t):
    """An accelerator tensor's CPU data (for comparing results outside the mode)."""
    return tree_map(lambda x: x.inner if isinstance(x, OnAccelerator) else x, t)
