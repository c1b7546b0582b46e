"""The attention interface the core calls. Kernels come from backends.

Every diffusers DiT computes attention through `torch.nn.functional.scaled_dot_product_attention`
(diffusers' "native" attention backend). While an accelerated transformer runs, an
`AttentionRouter` (a `TorchFunctionMode`, active only inside that transformer's forward) sends
each such call to a backend kernel: the one the user named, or per call the highest-priority
kernel whose declared capabilities fit. Parallel plans wrap the same call site. Nothing global
is patched, so other models and pipelines in the process are untouched.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

CP_MODES = ("ulysses", "ring", "usp")


@dataclass(frozen=True)
class AttentionKernel:
    """An attention implementation with declared capabilities.

    fn(query, key, value, *, attn_mask=None, is_causal=False, scale=None, return_lse=False)
    takes tensors laid out (batch, heads, seq, head_dim), like SDPA, and returns the output in
    the same layout, or (output, lse) with lse of shape (batch, heads, seq_q) in float32 when
    `return_lse` is asked and the kernel declares `returns_lse`.
    """

    name: str
    fn: Callable = field(repr=False, compare=False)
    dtypes: frozenset = frozenset({torch.float32, torch.float16, torch.bfloat16})
    head_dims: tuple[int, int] = (1, 1024)  # inclusive range
    head_dim_multiple: int = 1
    returns_lse: bool = False
    supports_mask: bool = True
    supports_causal: bool = True
    supports_gqa: bool = False
    cp_modes: frozenset = frozenset(CP_MODES)
    priority: int = 0
    exact: bool = False  # bitwise-deterministic reference math
    description: str = ""

    def unsupported(
        self,
        dtype: torch.dtype,
        head_dim: int,
        *,
        mask: bool = False,
        causal: bool = False,
        need_lse: bool = False,
        gqa: bool = False,
        cp_mode: str | None = None,
    ) -> str:
        """Why this kernel can't serve such a call ("" when it can)."""
        lo, hi = self.head_dims
        if dtype not in self.dtypes:
            return f"dtype {dtype} not in {sorted(str(d) for d in self.dtypes)}"
        if not lo <= head_dim <= hi or head_dim % self.head_dim_multiple:
            return f"head_dim {head_dim} outside {lo}..{hi} (multiple of {self.head_dim_multiple})"
        if mask and not self.supports_mask:
            return "attention masks are not supported"
        if causal and not self.supports_causal:
            return "causal attention is not supported"
        if need_lse and not self.returns_lse:
            return "it does not return the log-sum-exp"
        if gqa and not self.supports_gqa:
            return "grouped-query attention is not supported"
        if cp_mode is not None and cp_mode not in self.cp_modes:
            return f"context-parallel mode {cp_mode!r} not in {sorted(self.cp_modes)}"
        return ""


def select_kernel(
    kernels: list[AttentionKernel], requested: str | None, dtype: torch.dtype, head_dim: int, **needs
) -> AttentionKernel:
    """The named kernel if it fits, else (requested None or "auto") the best that fits; ValueError otherwise."""
    if requested not in (None, "auto"):
        by_name = {k.name: k for k in kernels}
        if requested not in by_name:
            raise ValueError(f"attention={requested!r} is not a kernel of this backend; allowed values: 'auto', "
                             f"{', '.join(repr(n) for n in by_name)}")
        why = by_name[requested].unsupported(dtype, head_dim, **needs)
        if why:
            raise ValueError(f"attention={requested!r} cannot serve this model: {why}")
        return by_name[requested]
    reasons = []
    for k in sorted(kernels, key=lambda k: -k.priority):
        why = k.unsupported(dtype, head_dim, **needs)
        if not why:
            return k
        reasons.append(f"{k.name}: {why}")
    raise ValueError(f"no attention kernel fits dtype={dtype}, head_dim={head_dim}, {needs}: " + "; ".join(reasons))


def needs_router(kernels: list[AttentionKernel], requested: str | None, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether attention must be routed at all: a kernel was named, or a backend kernel outranks torch's
    SDPA for this model's calls. Otherwise the model's own SDPA calls stay exactly as they are."""
    if requested not in (None, "auto"):
        return requested != TORCH_SDPA.name
    return any(select_kernel(kernels, None, dtype, head_dim, mask=mask).name != TORCH_SDPA.name for mask in (False, True))


# Tensor methods written in Python end in `super().name()`, which dynamo cannot trace while a
# torch function mode is active (a graph break per call); their torch.* forms are equivalent.
_FUNCTIONAL_FORMS = frozenset({"unflatten", "split", "norm", "unique"})


class AttentionRouter(TorchFunctionMode):
    """Routes SDPA calls made inside it to backend kernels and counts which kernel ran."""

    def __init__(self, kernels: list[AttentionKernel], requested: str | None = None,
                 wrapper: Callable | None = None) -> None:
        super().__init__()
        self.kernels = kernels
        self.requested = requested
        self.chosen: dict[tuple, AttentionKernel] = {}  # call signature -> kernel, decided once
        self.calls: Counter = Counter()  # eager calls per kernel (not counted inside compiled graphs)
        # A parallel plan runs every call through its wrapper: wrapper(router, q, k, v, **kw) -> out.
        self.wrapper: Callable | None = wrapper

    def wrap(self, wrapper: Callable) -> None:
        """Run every call through `wrapper` (one parallel plan at a time); `unwrap` takes it off."""
        if self.wrapper is not None and self.wrapper != wrapper:
            raise RuntimeError("this attention router already runs through another parallel plan's wrapper")
        self.wrapper = wrapper

    def unwrap(self, wrapper: Callable) -> None:
        if self.wrapper == wrapper:
            self.wrapper = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            if getattr(func, "__module__", None) == "torch._tensor" and func.__name__ in _FUNCTIONAL_FORMS:
                func = getattr(torch, func.__name__)
            return func(*args, **kwargs)
        return self.attend(*args, **kwargs)

    def kernel_for(self, query, key, attn_mask=None, is_causal=False, need_lse=False, cp_mode=None):
        """The kernel for this call signature; chosen once, so compiled graphs see a stable choice."""
        sig = (query.dtype, query.shape[-1], attn_mask is not None, is_causal, need_lse,
               query.shape[-3] != key.shape[-3], cp_mode)
        kernel = self.chosen.get(sig)
        if kernel is None:
            kernel = select_kernel(self.kernels, self.requested, sig[0], sig[1], mask=sig[2], causal=sig[3],
                                   need_lse=sig[4], gqa=sig[5], cp_mode=sig[6])
            self.chosen[sig] = kernel
        if not torch.compiler.is_compiling():
            self.calls[kernel.name] += 1
        return kernel

    def attend(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False, **extra):
        if dropout_p:
            raise ValueError("cachedit attention serves inference only: dropout_p must be 0")
        if self.wrapper is not None:
            return self.wrapper(self, query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
        kernel = self.kernel_for(query, key, attn_mask, is_causal)
        # Inside __torch_function__ this mode is off, so kernels may call SDPA themselves.
        return kernel.fn(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


def sdpa_kernel(query, key, value, *, attn_mask=None, is_causal=False, scale=None, return_lse=False):
    """torch's own SDPA: available on every device type, no log-sum-exp."""
    if return_lse:
        raise ValueError("torch SDPA does not return the log-sum-exp")
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


TORCH_SDPA = AttentionKernel(
    name="torch_sdpa", fn=sdpa_kernel, priority=-100, description="torch.nn.functional.scaled_dot_product_attention"
)
