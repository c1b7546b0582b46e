"""Async Ulysses: each tensor's all-to-all is in flight while the next tensor is projected.

The attention router sees only the SDPA call, when every projection is already done, so there
the q, k and v exchanges can only be posted together. With `ParallelConfig(async_ulysses=True)`
the attention modules a context-parallel plan runs with Ulysses get a processor of their family
that computes the tensor needing the least work first and posts its exchange before the next:

    V (projection) -> post;  K (projection, norm, rotary) -> post;  Q (the same) -> post;
    wait, attend this rank's heads over the whole sequence, exchange the output back.

Joint attention (FLUX double blocks, Qwen-Image) concatenates text and image tokens in one order
for Q, K and V, so keys and values stay aligned and the output splits as the original's does.
Families: FLUX (double and single blocks), Qwen-Image, Wan and Wan 2.2 (self-attention; the
cross-attention stays local), Z-Image. Other families (FLUX.2, LTX) keep the router path, which
posts the three exchanges together. With fused q/k/v projections (`CompileConfig.fuse_qkv`) the
one GEMM comes first and only norms and rotary overlap. A call a processor does not serve
(cross-attention) runs the original processor, through the router, as before.

The swap is a hook (`AsyncUlyssesHook`): detaching it puts the original processor object back.
"""

from __future__ import annotations

import fnmatch

import torch
from diffusers.hooks import ModelHook

from .. import hooks
from .._diffusers_compat import apply_rotary_emb, qwen_rotary
from .ring import ring_attention
from .ulysses import HEADS, SEQ, Exchange, gather_key_mask, gather_lengths, key_mask, split_sizes

HOOK_NAME = "cachedit.cp.async"


class _Exchanges:
    """One attention call's all-to-alls, posted one tensor at a time, then attended and sent back."""

    def __init__(self, cp, seq: int, mask: torch.Tensor | None, device: torch.device) -> None:
        self.cp, self.comm = cp, cp.ulysses
        world = self.comm.world_size
        # Lengths are needed to post, so they are learnt first (one small all-gather, uneven calls only).
        self.lens = gather_lengths(self.comm, seq, device=device)[0] if cp.state.uneven else [seq] * world
        self.mask = mask
        self.posted: dict[str, Exchange] = {}

    def post(self, name: str, x: torch.Tensor) -> None:
        """Send `x`, laid out (batch, seq, heads, head_dim) as diffusers' processors build it."""
        self.heads = split_sizes(x.shape[2], self.comm.world_size)
        with torch._C.DisableTorchFunction():  # wire work, not attention: past the router
            local = x.transpose(1, 2)
            if name == "k" and self.mask is not None:
                self.mask = key_mask(self.mask, local)
            self.posted[name] = Exchange(self.comm, local, HEADS, SEQ, self.heads, self.lens,
                                          self.cp.config.fp8_comm, async_op=True)

    def attend(self) -> torch.Tensor:
        """Attention over every rank's tokens for this rank's queries: (batch, seq_local, heads, head_dim)."""
        cp, comm, router = self.cp, self.comm, self.cp.router
        with torch._C.DisableTorchFunction():  # a kernel may call SDPA itself: keep it from the router
            mask = self.mask
            if mask is not None:  # gathered while q, k and v are in flight
                mask = gather_key_mask(comm, mask, self.heads, sum(self.heads), cp.state.uneven)
            v, k, q = (self.posted[n].wait() for n in "vkq")
            if cp.mode == "usp":  # Ring across the rows of the mesh, for this rank's heads
                kernel = router.kernel_for(q, k, mask, False, need_lse=True, cp_mode="usp")
                out = ring_attention(cp.ring, q, k, v, mask, None, kernel, uneven=cp.state.uneven)
            else:
                kernel = router.kernel_for(q, k, mask, False, cp_mode="ulysses")
                out = kernel.fn(q, k, v, attn_mask=mask, is_causal=False, scale=None)
            back = Exchange(comm, out, SEQ, HEADS, self.lens, self.heads, cp.config.fp8_comm, async_op=False)
            return back.wait().transpose(1, 2)


def _fused(linear, x: torch.Tensor) -> dict:
    """q, k and v from one fused GEMM (`fuse_qkv`): only norms and rotary are left to overlap."""
    return dict(zip("qkv", linear(x).chunk(3, dim=-1)))


class _AsyncProcessor:
    """Base of the family processors: the original processor (the fallback) and the plan applied."""

    def __init__(self, original, cp) -> None:
        self.original = original
        self.cp = cp
        self.served = 0  # calls served with the overlap (the original's calls are not counted)

    def start(self, seq: int, mask: torch.Tensor | None, device: torch.device) -> _Exchanges:
        self.served += 1
        return _Exchanges(self.cp, seq, mask, device)


class FluxAsyncProcessor(_AsyncProcessor):
    """FLUX double blocks (text + image, joint) and single blocks (one stream)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        txt_len = encoder_hidden_states.shape[1] if joint else 0
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        ex = self.start(txt_len + hidden_states.shape[1], attention_mask, hidden_states.device)
        own = _fused(attn.to_qkv, hidden_states) if attn.fused_projections else None
        added = _fused(attn.to_added_qkv, encoder_hidden_states) if attn.fused_projections and joint else None

        def project(kind):  # "v": projection only; "k", "q": projection, norm, rotary
            x = own[kind] if own else getattr(attn, f"to_{kind}")(hidden_states)
            x = x.unflatten(-1, (-1, attn.head_dim))
            x = x if kind == "v" else getattr(attn, f"norm_{kind}")(x)
            if joint:  # [text, image], the original's order for q, k and v alike
                e = added[kind] if added else getattr(attn, f"add_{kind}_proj")(encoder_hidden_states)
                e = e.unflatten(-1, (-1, attn.head_dim))
                x = torch.cat([e if kind == "v" else getattr(attn, f"norm_added_{kind}")(e), x], dim=1)
            if kind != "v" and image_rotary_emb is not None:
                x = apply_rotary_emb(x, image_rotary_emb, sequence_dim=1)
            return x

        ex.post("v", project("v"))
        ex.post("k", project("k"))
        query = project("q")
        ex.post("q", query)
        out = ex.attend().flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        txt_len = encoder_hidden_states.shape[1]
        txt, out = out.split_with_sizes([txt_len, out.shape[1] - txt_len], dim=1)
        return attn.to_out[1](attn.to_out[0](out.contiguous())), attn.to_add_out(txt.contiguous())


class QwenImageAsyncProcessor(_AsyncProcessor):
    """Qwen-Image double-stream blocks: joint attention over [text, image], text key mask optional."""

    def __init__(self, original, cp) -> None:
        super().__init__(original, cp)
        self.rotary = qwen_rotary()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None or attention_mask is not None:  # the original says why it refuses
            return self.original(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                 attention_mask, image_rotary_emb)
        mask = None
        if encoder_hidden_states_mask is not None:
            image = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            mask = torch.cat([encoder_hidden_states_mask, image], dim=1)[:, None, None, :]
        txt_len = encoder_hidden_states.shape[1]
        ex = self.start(txt_len + hidden_states.shape[1], mask, hidden_states.device)
        head_dim = attn.inner_dim // attn.heads

        def project(kind):  # "v": projections only; "k", "q": projections, norms, rotary
            img = getattr(attn, f"to_{kind}")(hidden_states).unflatten(-1, (-1, head_dim))
            txt = getattr(attn, f"add_{kind}_proj")(encoder_hidden_states).unflatten(-1, (-1, head_dim))
            if kind != "v":
                norm, added_norm = getattr(attn, f"norm_{kind}"), getattr(attn, f"norm_added_{kind}")
                img = norm(img) if norm is not None else img
                txt = added_norm(txt) if added_norm is not None else txt
                if image_rotary_emb is not None:
                    img_freqs, txt_freqs = image_rotary_emb
                    img = self.rotary(img, img_freqs, use_real=False)
                    txt = self.rotary(txt, txt_freqs, use_real=False)
            return torch.cat([txt, img], dim=1)

        ex.post("v", project("v"))
        ex.post("k", project("k"))
        query = project("q")
        ex.post("q", query)
        out = ex.attend().flatten(2, 3).to(query.dtype)
        img = attn.to_out[0](out[:, txt_len:, :].contiguous())
        if len(attn.to_out) > 1:
            img = attn.to_out[1](img)
        return img, attn.to_add_out(out[:, :txt_len, :].contiguous())


def _rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary: each pair (x[2i], x[2i+1]) turned by its angle (the tables repeat each angle twice)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2).type_as(x)


class WanAsyncProcessor(_AsyncProcessor):
    """Wan self-attention (attn1); cross-attention (attn2) is local and keeps its own processor."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attn.add_k_proj is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        ex = self.start(hidden_states.shape[1], attention_mask, hidden_states.device)
        fused = _fused(attn.to_qkv, hidden_states) if attn.fused_projections else None

        def project(kind):  # "v": projection only; "k", "q": projection, norm (across heads), rotary
            x = fused[kind] if fused else getattr(attn, f"to_{kind}")(hidden_states)
            x = (x if kind == "v" else getattr(attn, f"norm_{kind}")(x)).unflatten(2, (attn.heads, -1))
            return _rotate_interleaved(x, *rotary_emb) if kind != "v" and rotary_emb is not None else x

        ex.post("v", project("v"))
        ex.post("k", project("k"))
        query = project("q")
        ex.post("q", query)
        out = ex.attend().flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _rotate_complex(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Z-Image's rotary: pairs as complex numbers times the (seq, head_dim / 2) complex table, in float32."""
    with torch.autocast(x.device.type, enabled=False):
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * freqs.unsqueeze(2)).flatten(3).type_as(x)


class ZImageAsyncProcessor(_AsyncProcessor):
    """Z-Image single-stream attention (refiners and main layers), with its key mask."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        ex = self.start(hidden_states.shape[1], attention_mask, hidden_states.device)

        def project(kind):  # "v": projection only; "k", "q": projection, norm, rotary
            x = getattr(attn, f"to_{kind}")(hidden_states).unflatten(-1, (attn.heads, -1))
            if kind == "v":
                return x
            norm = getattr(attn, f"norm_{kind}")
            x = norm(x) if norm is not None else x
            return _rotate_complex(x, freqs_cis) if freqs_cis is not None else x

        ex.post("v", project("v"))
        ex.post("k", project("k"))
        query = project("q")
        ex.post("q", query)
        out = attn.to_out[0](ex.attend().flatten(2, 3).to(query.dtype))
        return attn.to_out[1](out) if len(attn.to_out) > 1 else out


# The original processor class (by name, like the plans) -> its async processor.
PROCESSORS = {
    "FluxAttnProcessor": FluxAsyncProcessor,
    "QwenDoubleStreamAttnProcessor2_0": QwenImageAsyncProcessor,
    "WanAttnProcessor": WanAsyncProcessor,
    "ZSingleStreamAttnProcessor": ZImageAsyncProcessor,
}


class AsyncUlyssesHook(ModelHook):
    """While attached, the attention module runs `processor`; detaching restores the original object."""

    def __init__(self, processor: _AsyncProcessor) -> None:
        super().__init__()
        self.processor = processor

    def initialize_hook(self, module):
        module.processor = self.processor
        return module

    def deinitalize_hook(self, module):  # diffusers' spelling
        module.processor = self.processor.original
        return module


def install_async_ulysses(transformer, cp) -> None:
    """Give each attention module of `transformer` that `cp` runs with Ulysses its family's async
    processor; the hooks go on `cp.attached`, so removing the plan removes them."""
    for name, module in transformer.named_modules():
        make = PROCESSORS.get(type(getattr(module, "processor", None)).__name__)
        if make is None or any(fnmatch.fnmatchcase(name, p) for p in cp.plan.local_attention):
            continue
        hooks.attach(module, AsyncUlyssesHook(make(module.processor, cp)), HOOK_NAME)
        cp.attached.append((module, HOOK_NAME))
