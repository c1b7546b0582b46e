"""Tensor-parallel plans: which linears of a model are sharded how, and where partial sums meet.

A plan reuses diffusers' `_tp_plan` vocabulary (`diffusers/hooks/tensor_parallel.py`): a dict from
module path (one `*` for every element of a ModuleList) to a style,

- "colwise": output features split over the ranks (weight rows, bias alike); the output stays split,
- "rowwise": input features split (weight columns); the output is a partial sum, bias added once,
- `PackedColwiseParallel(blocks)` / `PackedRowwiseParallel(blocks)`: the same for fused projections
  (each block of the fused dim split on its own; `blocks=None` reads `_tp_packed_*_blocks` off the Linear),

plus two styles of our own for what diffusers' plans leave replicated,

- "colwise_gather": column-split, output all-gathered (AdaLN modulation: its output is whole again),
- "sharded_rmsnorm": an RMSNorm over a column-split width (Wan's q/k norms across heads): weight
  split, the sum of squares all-reduced.

`reduce` names the modules at whose output the row-split partial sums are all-reduced (one
all-reduce per module call, over every tensor it returns), and `heads` the attention modules whose
`heads` attribute must become the local head count (processors that unflatten with it).
A family is supported only where someone checked its model code: `TP_PLANS.register(class, build)`
(a plugin: in `cachedit_register_models`).
Text encoders (transformers classes) are planned the same way, see the bottom of this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn
from .._diffusers_compat import PackedColwiseParallel, PackedRowwiseParallel, tp_plan

from .. import model_lookup
from ..modelinfo import config_value
from ..registry import Registry, functions_returning

__all__ = ["PackedColwiseParallel", "PackedRowwiseParallel", "TPPlan", "TP_PLANS", "supported_tp_classes",
           "tp_plan_for"]

STYLES = ("colwise", "rowwise", "colwise_gather", "sharded_rmsnorm")


@dataclass(frozen=True)
class TPPlan:
    linears: tuple[tuple[str, Any], ...]  # (path pattern, style)
    # Modules whose outputs are all-reduced (the row-split partial sums meet): a path pattern, or
    # (pattern, output indices) when the module also returns per-head tensors (attention weights).
    reduce: tuple[str | tuple[str, tuple[int, ...]], ...]
    # Attention modules whose head-count attribute becomes the local count: a pattern (attribute
    # "heads"), or (pattern, attribute name).
    heads: tuple[str | tuple[str, str], ...] = ()
    head_counts: tuple[int, ...] = ()  # head counts (query, key/value) every rank must split evenly
    source: str = "cachedit"

    def reduce_points(self) -> list[tuple[str, tuple[int, ...] | None]]:
        return [(r, None) if isinstance(r, str) else r for r in self.reduce]

    def head_attrs(self) -> list[tuple[str, str]]:
        return [(h, "heads") if isinstance(h, str) else h for h in self.heads]


TPPlanBuilder = Callable[[nn.Module], TPPlan]

# Module class name -> how modules of that class are sharded for tensor parallelism.
TP_PLANS: Registry[TPPlanBuilder] = Registry(
    "tensor-parallel plan", check=functions_returning("tensor-parallel plan"), before_lookup=model_lookup.before_lookup)


def supported_tp_classes() -> list[str]:
    return sorted(TP_PLANS.names())


def tp_plan_for(module: nn.Module) -> TPPlan | None:
    name = type(module).__name__
    return TP_PLANS.get(name)(module) if name in TP_PLANS else None


# -- diffusers transformers --------------------------------------------------------------------

def _flux(t: nn.Module, table: dict | None = None) -> TPPlan:
    """FLUX.1: diffusers' plan, plus the AdaLN modulation linears (a third of a double block's
    weights) column-split and gathered. Joint attention reduces its (image, text) outputs at once;
    the single block's attention and MLP meet in the packed row-split proj_out. `table`: the
    diffusers plan to start from (default: the class's own)."""
    linears = {**(tp_plan(type(t)) if table is None else table),
               "transformer_blocks.*.norm1.linear": "colwise_gather",
               "transformer_blocks.*.norm1_context.linear": "colwise_gather",
               "single_transformer_blocks.*.norm.linear": "colwise_gather"}
    reduce = ("transformer_blocks.*.attn", "transformer_blocks.*.ff", "transformer_blocks.*.ff_context",
              "single_transformer_blocks.*.proj_out")
    return TPPlan(tuple(linears.items()), reduce, head_counts=(config_value(t, "num_attention_heads"),),
                  source="diffusers")


def _flux2(t: nn.Module) -> TPPlan:
    """FLUX.2: diffusers' plan (packed fused projections); its modulation is shared by all blocks,
    computed once per call, so it is split and gathered at the top level."""
    linears = {**tp_plan(type(t)),
               "double_stream_modulation_img.linear": "colwise_gather",
               "double_stream_modulation_txt.linear": "colwise_gather",
               "single_stream_modulation.linear": "colwise_gather"}
    reduce = ("transformer_blocks.*.attn", "transformer_blocks.*.ff", "transformer_blocks.*.ff_context",
              "single_transformer_blocks.*.attn")
    return TPPlan(tuple(linears.items()), reduce, head_counts=(config_value(t, "num_attention_heads"),),
                  source="diffusers")


def _qwenimage(t: nn.Module) -> TPPlan:
    """Qwen-Image: diffusers' plan plus the per-stream modulation (img_mod / txt_mod)."""
    linears = {**tp_plan(type(t)),
               "transformer_blocks.*.img_mod.1": "colwise_gather",
               "transformer_blocks.*.txt_mod.1": "colwise_gather"}
    reduce = ("transformer_blocks.*.attn", "transformer_blocks.*.img_mlp", "transformer_blocks.*.txt_mlp")
    return TPPlan(tuple(linears.items()), reduce, head_counts=(config_value(t, "num_attention_heads"),),
                  source="diffusers")


def _wan(t: nn.Module) -> TPPlan:
    """Wan 2.x: self- and cross-attention split by heads (cross-attention K/V from the prompt, and
    the image-prompt K/V of I2V, alike); q/k RMSNorms span all heads, so they are distributed.
    The condition embedder is shared by every block and stays replicated."""
    linears: dict[str, Any] = {}
    for attn in ("attn1", "attn2"):
        for proj in ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj"):
            linears[f"blocks.*.{attn}.{proj}"] = "colwise"
        linears[f"blocks.*.{attn}.to_out.0"] = "rowwise"
        for norm in ("norm_q", "norm_k", "norm_added_k"):
            linears[f"blocks.*.{attn}.{norm}"] = "sharded_rmsnorm"
    linears["blocks.*.ffn.net.0.proj"] = "colwise"
    linears["blocks.*.ffn.net.2"] = "rowwise"
    return TPPlan(tuple(linears.items()), ("blocks.*.attn1", "blocks.*.attn2", "blocks.*.ffn"),
                  heads=("blocks.*.attn1", "blocks.*.attn2"), head_counts=(config_value(t, "num_attention_heads"),))


def _zimage(t: nn.Module) -> TPPlan:
    """Z-Image: every refiner and main layer alike; SwiGLU w1/w3 column-split, w2 row-split; the
    per-head q/k norms stay whole; AdaLN modulation split and gathered."""
    linears: dict[str, Any] = {}
    reduce, heads = [], []
    for stage in ("noise_refiner", "context_refiner", "siglip_refiner", "layers"):
        for proj in ("to_q", "to_k", "to_v"):
            linears[f"{stage}.*.attention.{proj}"] = "colwise"
        linears[f"{stage}.*.attention.to_out.0"] = "rowwise"
        linears[f"{stage}.*.feed_forward.w1"] = linears[f"{stage}.*.feed_forward.w3"] = "colwise"
        linears[f"{stage}.*.feed_forward.w2"] = "rowwise"
        linears[f"{stage}.*.adaLN_modulation.0"] = "colwise_gather"
        reduce += [f"{stage}.*.attention", f"{stage}.*.feed_forward"]
        heads.append(f"{stage}.*.attention")
    return TPPlan(tuple(linears.items()), tuple(reduce), tuple(heads), head_counts=(config_value(t, "n_heads"),))


def _flux_controlnet(c: nn.Module) -> TPPlan:
    """FluxControlNetModel: its transformer_blocks / single_transformer_blocks are FLUX.1's block
    classes, so FLUX.1's plan fits them as is. Its controlnet_blocks (one square linear per block,
    applied to the block's whole output), controlnet_x_embedder and embedders stay whole: sharding
    them would cost a gather each for little memory."""
    from diffusers import FluxTransformer2DModel

    return _flux(c, tp_plan(FluxTransformer2DModel))


for _name, _build in {
    "FluxTransformer2DModel": _flux,
    "FluxControlNetModel": _flux_controlnet,
    "Flux2Transformer2DModel": _flux2,
    "QwenImageTransformer2DModel": _qwenimage,
    "WanTransformer3DModel": _wan,
    "ZImageTransformer2DModel": _zimage,
}.items():
    TP_PLANS.register(_name, _build)


# -- transformers text encoders ----------------------------------------------------------------
# Sharded over every rank (ParallelConfig.text_encoder). Embeddings and heads stay replicated.

def _t5(m: nn.Module) -> TPPlan:
    """T5 / UMT5 encoders: heads split, with each rank's heads of the relative position bias
    (an Embedding over buckets x heads: its columns split); the FFN, gated or not, split."""
    layer = "encoder.block.*.layer"
    linears = {f"{layer}.0.SelfAttention.{p}": "colwise" for p in ("q", "k", "v", "relative_attention_bias")}
    linears[f"{layer}.0.SelfAttention.o"] = "rowwise"
    for p in ("wi", "wi_0", "wi_1"):
        linears[f"{layer}.1.DenseReluDense.{p}"] = "colwise"
    linears[f"{layer}.1.DenseReluDense.wo"] = "rowwise"
    return TPPlan(tuple(linears.items()), ((f"{layer}.0.SelfAttention", (0,)), f"{layer}.1.DenseReluDense"),
                  heads=((f"{layer}.0.SelfAttention", "n_heads"),), head_counts=(m.config.num_heads,))


def _clip(m: nn.Module) -> TPPlan:
    """CLIP text towers (with or without projection): attention and MLP of every layer."""
    layer = f"{'text_model.' if hasattr(m, 'text_model') else ''}encoder.layers.*"
    linears = {f"{layer}.self_attn.{p}": "colwise" for p in ("q_proj", "k_proj", "v_proj")}
    linears.update({f"{layer}.self_attn.out_proj": "rowwise", f"{layer}.mlp.fc1": "colwise",
                    f"{layer}.mlp.fc2": "rowwise"})
    return TPPlan(tuple(linears.items()), ((f"{layer}.self_attn", (0,)), f"{layer}.mlp"),
                  head_counts=(m.config.num_attention_heads,))


def _decoder(prefix: str) -> Callable[[nn.Module], TPPlan]:
    """Llama-style decoder LMs (Qwen2, Qwen2.5-VL's language model, Qwen3): q/k/v split by heads,
    grouped key/value heads alike (both counts must divide), SwiGLU gate/up split, down row-split.
    Attention reshapes with -1 heads and keeps its group ratio, so no attribute changes."""

    def build(m: nn.Module) -> TPPlan:
        layer = f"{prefix}layers.*"
        linears = {f"{layer}.self_attn.{p}": "colwise" for p in ("q_proj", "k_proj", "v_proj")}
        linears.update({f"{layer}.self_attn.o_proj": "rowwise", f"{layer}.mlp.gate_proj": "colwise",
                        f"{layer}.mlp.up_proj": "colwise", f"{layer}.mlp.down_proj": "rowwise"})
        cfg = getattr(m.config, "text_config", m.config)
        return TPPlan(tuple(linears.items()), ((f"{layer}.self_attn", (0,)), f"{layer}.mlp"),
                      head_counts=(cfg.num_attention_heads, cfg.num_key_value_heads))

    return build


for _name, _build in {
    "T5EncoderModel": _t5,
    "UMT5EncoderModel": _t5,
    "CLIPTextModel": _clip,
    "CLIPTextModelWithProjection": _clip,
    "Qwen2_5_VLForConditionalGeneration": _decoder("model.language_model."),
    "Qwen2Model": _decoder(""),
    "Qwen3Model": _decoder(""),
}.items():
    TP_PLANS.register(_name, _build)
