"""Model-family adapters: where a transformer's blocks are.

An adapter is declared per transformer class name. Adding a model means declaring an
adapter with `register_adapter`, never touching the core. A transformer with no declared
adapter gets a generic one: its `nn.ModuleList` attributes whose names end in "blocks" or
"layers", in definition order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

TRANSFORMER_COMPONENTS = ("transformer", "transformer_2")


@dataclass(frozen=True)
class Adapter:
    """family: a short name; block_lists: attribute names of the block ModuleLists, in call order."""

    family: str
    block_lists: tuple[str, ...]

    def blocks(self, transformer: nn.Module) -> list[nn.Module]:
        out: list[nn.Module] = []
        for name in self.block_lists:
            out.extend(getattr(transformer, name))
        return out


_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(transformer_class_name: str, adapter: Adapter) -> None:
    """Declare (or replace) the adapter for a transformer class, by class name."""
    _ADAPTERS[transformer_class_name] = adapter


def adapter_for(transformer: nn.Module) -> Adapter:
    name = type(transformer).__name__
    if name in _ADAPTERS:
        return _ADAPTERS[name]
    lists = tuple(
        attr for attr, child in transformer.named_children()
        if isinstance(child, nn.ModuleList) and len(child) and attr.endswith(("blocks", "layers"))
    )
    if not lists:
        raise ValueError(f"no adapter for transformer class {name!r} and no block lists found; declare one with "
                         f"cachedit.adapters.register_adapter({name!r}, Adapter(...))")
    return Adapter(family=name, block_lists=lists)


def transformers_of(pipe) -> dict[str, nn.Module]:
    """The pipeline's DiT components by attribute name (Wan 2.2 has two)."""
    found = {n: getattr(pipe, n, None) for n in TRANSFORMER_COMPONENTS}
    return {n: m for n, m in found.items() if isinstance(m, nn.Module)}


for _cls, _adapter in {
    "FluxTransformer2DModel": Adapter("flux", ("transformer_blocks", "single_transformer_blocks")),
    "Flux2Transformer2DModel": Adapter("flux2", ("transformer_blocks", "single_transformer_blocks")),
    "ChromaTransformer2DModel": Adapter("chroma", ("transformer_blocks", "single_transformer_blocks")),
    "QwenImageTransformer2DModel": Adapter("qwenimage", ("transformer_blocks",)),
    "WanTransformer3DModel": Adapter("wan", ("blocks",)),
    "SD3Transformer2DModel": Adapter("sd3", ("transformer_blocks",)),
    "ZImageTransformer2DModel": Adapter("zimage", ("layers",)),
}.items():
    register_adapter(_cls, _adapter)
