"""VAE parallelism: every rank decodes one horizontal band of the image; all end with the whole image.

Every rank gets the same latents. A hook on `vae.decoder` cuts them into bands along the height
(`tensor_split`: the first `H % world` ranks take one more row) and gathers the decoded bands at
the exit. Inside, each operation that looks beyond its own rows is made to see the whole image, so
the result equals the one-device decode (up to float rounding), not a tiled approximation:

- a convolution taller than one row gets `p` halo rows from each neighbour first (zero rows at
  the image border, exactly its zero padding), and its output is cropped back to the band;
- a GroupNorm's per-group statistics are combined over every band (count, mean and M2, merged
  with Chan's formula, one all-gather of a few numbers);
- attention attends each band's queries to every band's keys and values (K/V all-gathered);
- nearest 2x upsampling, 1x1 convolutions, per-pixel norms and activations are band-local.

Decoders are called once per decode, per tile under `enable_tiling()`, per sample under
`enable_slicing()`, per latent frame for Wan / Qwen-Image: each call is split the same way, so
tiling and slicing give exactly their one-device result. A call with fewer latent rows than
ranks x halo runs whole on every rank (no exchange): declared, not an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from diffusers.hooks import ModelHook

from .. import hooks
from .._diffusers_compat import original_forward
from ..attention import AttentionRouter
from .mesh import check_world
from .metering import MeteredCommunicator

HOOK_PREFIX = "cachedit.vae"
# AutoencoderKL (FLUX, SD3, Z-Image, Chroma...) and AutoencoderKLFlux2 share diffusers' 2D `Decoder`;
# Wan and Qwen-Image decode frame by frame with causal 3D convs, per-pixel RMS norms and per-frame attention.
SUPPORTED_VAES = ("AutoencoderKL", "AutoencoderKLFlux2", "AutoencoderKLWan", "AutoencoderKLQwenImage")
_ATTENTION_BLOCKS = ("WanAttentionBlock", "QwenImageAttentionBlock")  # call SDPA themselves
_SDPA_PROCESSORS = ("AttnProcessor2_0",)  # diffusers `Attention` processors that call SDPA
_HEIGHT = -2  # images (B, C, H, W) and videos (B, C, T, H, W) alike


class BandState:
    """What the hooks of one VAE share during one decoder call."""

    def __init__(self, comm) -> None:
        self.comm = comm
        self.world_size, self.rank = comm.world_size, comm.rank
        self.active = False  # inside a split decoder call
        self.uneven = False  # the bands of this call differ in height

    def halo(self, x: torch.Tensor, p: int) -> torch.Tensor:
        """`x` with `p` rows of each neighbour above and below; zeros at the image border.
        Two ring shifts: each rank's last rows go down, its first rows go up."""
        above = self.comm.send_recv_ring(x.narrow(_HEIGHT, x.shape[_HEIGHT] - p, p).contiguous(), shift=1)
        below = self.comm.send_recv_ring(x.narrow(_HEIGHT, 0, p).contiguous(), shift=-1)
        if self.rank == 0:
            above = torch.zeros_like(above)
        if self.rank == self.world_size - 1:
            below = torch.zeros_like(below)
        return torch.cat([above, x, below], dim=_HEIGHT)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.uneven:
            return self.comm.all_gather_uneven(x.contiguous(), dim=dim)
        return self.comm.all_gather(x.contiguous(), dim=dim)


class SplitDecodeHook(ModelHook):
    """On the decoder: decode this rank's band of the latents, return every rank's bands joined."""

    def __init__(self, state: BandState, min_rows: int) -> None:
        super().__init__()
        self.state = state
        self.min_rows = min_rows  # each band needs at least the tallest halo
        self.calls = {"split": 0, "whole": 0}

    def new_forward(self, module, sample, *args, **kwargs):
        state = self.state
        rows = sample.shape[_HEIGHT]
        if state.active or rows < state.world_size * self.min_rows:
            self.calls["whole"] += 1
            return original_forward(self)(sample, *args, **kwargs)
        self.calls["split"] += 1
        state.active, state.uneven = True, rows % state.world_size != 0
        try:
            band = sample.tensor_split(state.world_size, dim=_HEIGHT)[state.rank]
            out = original_forward(self)(band, *args, **kwargs)
        finally:
            state.active = False
        return state.gather(out, _HEIGHT)


class HaloConvHook(ModelHook):
    """A stride-1 convolution `2p + 1` rows tall: run it on the band plus `p` halo rows per side (its
    own zero padding then falls on the halo), keep the band's rows. Causal 3D convs (Wan) get their
    cached frames extended the same way, in the same exchange."""

    def __init__(self, state: BandState, p: int) -> None:
        super().__init__()
        self.state, self.p = state, p

    def new_forward(self, module, x, *args, **kwargs):
        if not self.state.active:
            return original_forward(self)(x, *args, **kwargs)
        p = self.p
        cache = kwargs.pop("cache_x", args[0] if args else None)
        if torch.is_tensor(cache):  # (B, C, T, H, W): the frames before x, along T
            both = self.state.halo(torch.cat([cache.to(x.device), x], dim=2), p)
            cache, x = both.split([cache.shape[2], x.shape[2]], dim=2)
            out = original_forward(self)(x, cache)
        else:
            out = original_forward(self)(self.state.halo(x, p), *args, **kwargs)
        return out.narrow(_HEIGHT, p, out.shape[_HEIGHT] - 2 * p)


class GroupNormHook(ModelHook):
    """GroupNorm with statistics over every band: per (sample, group) count, mean and sum of squared
    deviations from each rank, merged exactly as one pass over the whole image would compute them."""

    def __init__(self, state: BandState) -> None:
        super().__init__()
        self.state = state

    def new_forward(self, module: nn.GroupNorm, x):
        if not self.state.active:
            return original_forward(self)(x)
        b, c = x.shape[:2]
        xs = x.reshape(b, module.num_groups, -1).float()
        mean = xs.mean(-1)
        local = torch.stack([torch.full_like(mean, xs.shape[-1]), mean, (xs - mean[..., None]).square().sum(-1)], -1)
        n, means, m2 = self.state.comm.all_gather(local.unsqueeze(0), dim=0).unbind(-1)  # each (world, b, groups)
        total = n.sum(0)
        mean = (n * means).sum(0) / total
        var = (m2.sum(0) + (n * (means - mean).square()).sum(0)) / total
        y = ((xs - mean[..., None]) * torch.rsqrt(var[..., None] + module.eps)).reshape(x.shape).to(x.dtype)
        if module.affine:
            shape = (1, c) + (1,) * (x.dim() - 2)
            y = y * module.weight.view(shape) + module.bias.view(shape)
        return y


class AttendEverywhereHook(ModelHook):
    """Runs an attention module with its SDPA calls routed to `attend`: this band's queries against
    the keys and values of every band."""

    def __init__(self, state: BandState, router: AttentionRouter) -> None:
        super().__init__()
        self.state, self.router = state, router

    def new_forward(self, module, *args, **kwargs):
        if not self.state.active:
            return original_forward(self)(*args, **kwargs)
        before = sum(self.router.calls.values())
        with self.router:
            out = original_forward(self)(*args, **kwargs)
        if sum(self.router.calls.values()) == before:
            raise RuntimeError(f"VAE parallelism: {type(module).__name__} attended without calling "
                               "scaled_dot_product_attention, so its keys were never gathered; set its default "
                               "attention processor (AttnProcessor2_0)")
        return out


def _attend(state: BandState):
    def attend(router, query, key, value, attn_mask=None, is_causal=False, scale=None):
        if attn_mask is not None or is_causal:
            raise ValueError("VAE parallelism: the decoder's attention uses a mask or causal attention; "
                             "only full self-attention over the image is supported")
        key, value = state.gather(key, -2), state.gather(value, -2)  # sequence = rows x width, row-major
        kernel = router.kernel_for(query, key)
        return kernel.fn(query, key, value, attn_mask=None, is_causal=False, scale=scale)

    return attend


def _conv_halo(name: str, conv: nn.Module) -> int:
    """Halo rows the conv needs (0: band-local); ValueError for a conv that can't run on bands."""
    k, s, d = conv.kernel_size[-2], conv.stride[-2], conv.dilation[-2]
    span = d * (k - 1)
    if span == 0:
        return 0
    causal = getattr(conv, "_padding", None)  # Wan / Qwen-Image causal 3D conv: pads in forward
    pad = (causal[2], causal[3]) if causal is not None and conv.padding == (0, 0, 0) else (conv.padding[-2],) * 2
    if type(conv) not in (nn.Conv2d, nn.Conv3d) and causal is None:
        why = f"{type(conv).__name__} is not a plain or causal convolution"
    elif s != 1 or pad[0] != pad[1] or 2 * pad[0] != span or getattr(conv, "padding_mode", "zeros") != "zeros":
        why = f"stride {s}, height padding {pad}, padding_mode {conv.padding_mode!r}"
    else:
        return pad[0]
    raise ValueError(f"ParallelConfig.vae=True: decoder.{name} ({why}) cannot run on bands; supported: stride-1 "
                     f"convolutions with equal zero padding that keeps the height")


def _plan(vae: nn.Module) -> list[tuple[nn.Module, str, int]]:
    """(module, kind, halo rows) for every decoder module that needs a hook, kind one of "conv",
    "group_norm", "attention"; ValueError naming `ParallelConfig.vae` for anything that can't be split."""
    if type(vae).__name__ not in SUPPORTED_VAES or not isinstance(getattr(vae, "decoder", None), nn.Module):
        got = "pipe has no vae" if vae is None else f"pipe.vae is {type(vae).__name__}"
        raise ValueError(f"ParallelConfig.vae=True: {got}; supported VAE classes: {', '.join(SUPPORTED_VAES)}")
    plan = []
    for name, m in vae.decoder.named_modules():
        kind = type(m).__name__
        if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            raise ValueError(f"ParallelConfig.vae=True: decoder.{name} is a transposed convolution; not supported")
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            p = _conv_halo(name, m)
            if p:
                plan.append((m, "conv", p))
        elif isinstance(m, nn.GroupNorm):
            plan.append((m, "group_norm", 0))
        elif kind == "Attention" or kind in _ATTENTION_BLOCKS:
            processor = type(getattr(m, "processor", None)).__name__
            if kind == "Attention" and processor not in _SDPA_PROCESSORS:
                raise ValueError(f"ParallelConfig.vae=True: decoder.{name} uses the {processor} attention processor; "
                                 f"supported: {', '.join(_SDPA_PROCESSORS)} (they call scaled_dot_product_attention)")
            plan.append((m, "attention", 0))
        elif isinstance(m, nn.Upsample) and (m.mode not in ("nearest", "nearest-exact") or m.size is not None):
            raise ValueError(f"ParallelConfig.vae=True: decoder.{name} upsamples with mode={m.mode!r}, size={m.size}; "
                             "supported: nearest upsampling by a scale factor")
    return plan


def check_vae_parallel(pipe, config) -> None:
    """Every check that can fail before the VAE is hooked (ValueError)."""
    if not config.vae:
        return
    _plan(getattr(pipe, "vae", None))
    check_world(config)  # the decode is split over every rank


@dataclass
class VaeParallel:
    """One VAE's split decode as applied: its hooks and metered communicator."""

    comm: MeteredCommunicator
    entry: SplitDecodeHook
    attached: list = field(default_factory=list)  # (module, hook name)

    def stats(self) -> dict:
        """Bytes this rank sent and calls made per collective; decoder calls split / run whole."""
        return {"bytes": dict(self.comm.sent), "calls": dict(self.comm.calls), "decoder_calls": dict(self.entry.calls)}

    def reset_stats(self) -> None:
        self.comm.reset()
        self.entry.calls.update(split=0, whole=0)


def apply_vae_parallel(vae: nn.Module, comm, kernels: list) -> VaeParallel:
    """Hook `vae.decoder` to decode in bands over `comm`, every rank (`check_vae_parallel` first)."""
    comm = MeteredCommunicator(comm)
    state = BandState(comm)
    plan = _plan(vae)
    # its own router: the VAE's head dim (its channels) may not fit the user's kernel
    router = AttentionRouter(kernels, None, wrapper=_attend(state))
    vp = VaeParallel(comm, SplitDecodeHook(state, max([p for *_, p in plan] + [1])))
    try:
        for i, (module, kind, p) in enumerate(plan):
            if kind == "conv":
                hook = HaloConvHook(state, p)
            elif kind == "group_norm":
                hook = GroupNormHook(state)
            else:
                hook = AttendEverywhereHook(state, router)
            hooks.attach(module, hook, f"{HOOK_PREFIX}.{i}")
            vp.attached.append((module, f"{HOOK_PREFIX}.{i}"))
        hooks.attach(vae.decoder, vp.entry, f"{HOOK_PREFIX}.split")
        vp.attached.append((vae.decoder, f"{HOOK_PREFIX}.split"))
    except BaseException:
        remove_vae_parallel(vp)
        raise
    return vp


def remove_vae_parallel(vp: VaeParallel) -> None:
    """Undo `apply_vae_parallel` exactly (hooks come off in reverse order)."""
    for module, name in reversed(vp.attached):
        hooks.detach(module, name)
    vp.attached.clear()
