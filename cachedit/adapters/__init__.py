"""Model-family adapters: where a transformer's blocks are and what they take and return.

An adapter is declared per transformer class name. Adding a model means declaring an
adapter with `ADAPTERS.register(class_name, Adapter(...))` (and, for a block class diffusers does
not describe, its `BlockIO` with `BLOCK_IO.register(...)`), never touching the core; a plugin does
the same in `cachedit_register_models`. A transformer with no declared
adapter gets a generic one: its `nn.ModuleList` attributes whose names end in "blocks" or
"layers", in definition order.

Consecutive block lists whose blocks have the same `BlockIO` form one *stack* (FLUX.1's
double- and single-stream blocks both take and return image and text streams); a list whose
blocks differ (FLUX.2's single blocks take one concatenated stream) is a stack of its own.
Caches work per stack.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import model_lookup
from ..registry import Registry

TRANSFORMER_COMPONENTS = ("transformer", "transformer_2")


@dataclass(frozen=True)
class Adapter:
    """family: a short name; block_lists: attribute names of the block ModuleLists, in call order;
    text_arg: the transformer's text-embedding argument, whose identity names a CFG branch when the
    pipeline sets no cache_context (None: never infer branches, e.g. batched CFG)."""

    family: str
    block_lists: tuple[str, ...]
    text_arg: str | None = "encoder_hidden_states"
    pure_modules: tuple[str, ...] = ()  # children that are pure functions of their inputs (rotary embeddings)
    fuses_qkv: bool = False  # its attention processors use fused q/k/v linears when `fused_projections` is set

    def blocks(self, transformer: nn.Module) -> list[nn.Module]:
        out: list[nn.Module] = []
        for name in self.block_lists:
            out.extend(getattr(transformer, name))
        return out


    def stacks(self, transformer: nn.Module) -> list[list[nn.Module]]:
        """Block lists merged into stacks of blocks sharing one calling convention."""
        out: list[list[nn.Module]] = []
        last_io = None
        for name in self.block_lists:
            blocks = list(getattr(transformer, name))
            io = block_io(blocks[0])
            if out and io == last_io:
                out[-1].extend(blocks)
            else:
                out.append(blocks)
            last_io = io
        return out


@dataclass(frozen=True)
class BlockIO:
    """How a block is called and what it returns: the image stream ("hidden") and, for dual-stream
    blocks, the text stream ("encoder"). Indices are positions in the returned tuple; None when the
    block returns a single tensor or does not carry that stream."""

    hidden_arg: str = "hidden_states"
    encoder_arg: str | None = "encoder_hidden_states"
    return_hidden: int | None = 0
    return_encoder: int | None = None

    def inputs(self, block: nn.Module, args: tuple, kwargs: dict):
        """(hidden, encoder or None) from a call's arguments."""
        names = param_names(type(block))
        def get(name):
            if name is None:
                return None
            if name in kwargs:
                return kwargs[name]
            i = names.index(name) if name in names else None
            return args[i] if i is not None and i < len(args) else None
        return get(self.hidden_arg), get(self.encoder_arg)

    def outputs(self, output):
        """(hidden, encoder or None) from a call's return value."""
        if isinstance(output, torch.Tensor):
            return output, None
        enc = output[self.return_encoder] if self.return_encoder is not None else None
        return output[self.return_hidden or 0], enc

    def pack(self, hidden, encoder):
        """A return value in the block's own format."""
        if self.return_encoder is None:
            return hidden
        out = [None, None]
        out[self.return_hidden or 0], out[self.return_encoder] = hidden, encoder
        return tuple(out)


_PARAM_NAMES: dict[type, list[str]] = {}


def param_names(cls: type) -> list[str]:
    """The names of a module class's forward parameters, after `self`: how positional arguments map to names."""
    if cls not in _PARAM_NAMES:
        _PARAM_NAMES[cls] = list(inspect.signature(cls.forward).parameters)[1:]
    return _PARAM_NAMES[cls]


def _check_block_io(name: str, io) -> None:
    if not isinstance(io, BlockIO):
        raise TypeError(f"block IO for {name!r} must be a cachedit.adapters.BlockIO, got {type(io).__name__}")


# How blocks of a class (by class name) are called, where diffusers' own registry does not say (or is wrong).
BLOCK_IO: Registry[BlockIO] = Registry("block IO", check=_check_block_io, before_lookup=model_lookup.before_lookup)


def block_io(block: nn.Module) -> BlockIO:
    """Our declaration, else diffusers' TransformerBlockRegistry, else the single-stream default."""
    name = type(block).__name__
    if name in BLOCK_IO:
        return BLOCK_IO.get(name)
    from .._diffusers_compat import block_metadata

    meta = block_metadata(type(block))
    params = param_names(type(block))
    if meta is None:
        enc = "encoder_hidden_states" if "encoder_hidden_states" in params else None
        return BlockIO(params[0], enc, 0, None)
    enc_arg = meta.encoder_hidden_states_argument_name if meta.encoder_hidden_states_argument_name in params else None
    hidden_arg = meta.hidden_states_argument_name if meta.hidden_states_argument_name in params else params[0]
    return BlockIO(hidden_arg, enc_arg, meta.return_hidden_states_index, meta.return_encoder_hidden_states_index)


def modulated_input(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The first block's timestep-modulated input (TeaCache's signal): its AdaLN `norm1` applied to
    the hidden states with the block's `temb`, for the blocks built that way (FLUX, SD3, Chroma,
    HunyuanVideo, ...); None for blocks that modulate otherwise."""
    norm = getattr(block, "norm1", None)
    names = param_names(type(block))
    temb = kwargs.get("temb")
    if temb is None and "temb" in names and names.index("temb") < len(args):
        temb = args[names.index("temb")]
    if norm is None or temb is None:
        return None
    try:
        out = norm(block_io(block).inputs(block, args, kwargs)[0], emb=temb)
    except TypeError:  # a norm1 that takes no `emb`
        return None
    return out[0] if isinstance(out, tuple) else out


def _check_adapter(name: str, adapter) -> None:
    if not isinstance(adapter, Adapter):
        raise TypeError(f"the adapter for {name!r} must be a cachedit.adapters.Adapter, got {type(adapter).__name__}")


# Transformer class name -> its Adapter.
ADAPTERS: Registry[Adapter] = Registry("model adapter", check=_check_adapter, before_lookup=model_lookup.before_lookup)


register_adapter = ADAPTERS.register  # the old spelling, kept for existing callers


def adapter_for(transformer: nn.Module) -> Adapter:
    """The declared adapter of the transformer's class, else the generic one."""
    name = type(transformer).__name__
    if name in ADAPTERS:
        return ADAPTERS.get(name)
    lists = tuple(
        attr for attr, child in transformer.named_children()
        if isinstance(child, nn.ModuleList) and len(child) and attr.endswith(("blocks", "layers"))
    )
    if not lists:
        raise ValueError(f"no adapter for transformer class {name!r} and no block lists found; declare one with "
                         f"cachedit.adapters.ADAPTERS.register({name!r}, Adapter(...))")
    return Adapter(family=name, block_lists=lists)


def transformers_of(pipe) -> dict[str, nn.Module]:
    """The pipeline's DiT components by attribute name (Wan 2.2 has two)."""
    found = {n: getattr(pipe, n, None) for n in TRANSFORMER_COMPONENTS}
    return {n: m for n, m in found.items() if isinstance(m, nn.Module)}


for _cls, _adapter in {
    "FluxTransformer2DModel": Adapter("flux", ("transformer_blocks", "single_transformer_blocks"), fuses_qkv=True,
                                      pure_modules=("pos_embed",)),
    "Flux2Transformer2DModel": Adapter("flux2", ("transformer_blocks", "single_transformer_blocks"), fuses_qkv=True,
                                       pure_modules=("pos_embed",)),
    "ChromaTransformer2DModel": Adapter("chroma", ("transformer_blocks", "single_transformer_blocks"), fuses_qkv=True,
                                        pure_modules=("pos_embed",)),
    "QwenImageTransformer2DModel": Adapter("qwenimage", ("transformer_blocks",), pure_modules=("pos_embed",)),
    "WanTransformer3DModel": Adapter("wan", ("blocks",), fuses_qkv=True),
    "SD3Transformer2DModel": Adapter("sd3", ("transformer_blocks",)),
    "ZImageTransformer2DModel": Adapter("zimage", ("layers",), text_arg=None),
}.items():
    ADAPTERS.register(_cls, _adapter)

for _cls, _io in {
    "ChromaTransformerBlock": BlockIO("hidden_states", "encoder_hidden_states", 1, 0),
    "ChromaSingleTransformerBlock": BlockIO("hidden_states", None, 0, None),
    "Lumina2TransformerBlock": BlockIO("hidden_states", None, 0, None),
    "ZImageTransformerBlock": BlockIO("x", None, 0, None),
}.items():
    BLOCK_IO.register(_cls, _io)
