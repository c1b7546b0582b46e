"""Tensor parallelism: each rank holds 1/N of a model's block weights and computes 1/N of its heads.

A plan (`tp_plans.py`) names a style per linear. Column-split linears ("colwise", packed or not)
keep this rank's output features: q/k/v then hold `heads / N` whole heads, an MLP's first linear
its share of the hidden features. Row-split linears ("rowwise") keep the matching input features,
so their output is this rank's partial sum of the full product; the bias stays on the group's
first rank only, so the sum adds it once. Attention is per head and activations are elementwise,
so nothing is exchanged between the column and the row split.

The partial sums meet at the plan's `reduce` modules: one all-reduce at the output of each
attention module (a joint attention returning (image, text) flattens both into that one
all-reduce) and of each feed-forward module. A block therefore costs one all-reduce per attention
or MLP it has: FLUX/Qwen-Image double blocks 3 (attention, image MLP, text MLP), FLUX single
blocks 1 (attention and MLP meet in the fused proj_out), Z-Image 2, Wan 3 plus 2 small ones per
attention for the q/k RMSNorms that span every head ("sharded_rmsnorm": the sum of squares is
all-reduced). AdaLN modulation linears ("colwise_gather") are column-split and their small output
all-gathered, one all-gather each. Head counts must divide by the degree; other split dims (an
MLP's hidden features, e.g. Z-Image's 8/3 ratio) may split unevenly, like `tensor_split`.

Every rank of a tensor group ends each reduce with the same sum, so cache decisions agree without
a reduce of their own. With context parallelism too (`mesh.hybrid_mesh`: (cfg, ring, ulysses, tensor),
tensor innermost), the sequence is split over each context-parallel group, which averages the cache
statistic over its ranks as usual; tensor peers hold identical values, so all groups agree.

Sharding uses plain local tensors: each planned parameter is replaced by this rank's shard. The
originals (the very Parameter objects) are kept on the host in the `TensorParallel` record, as
`QuantConfig(keep_original=True)` does, so `remove_tensor_parallel` restores the model bit for bit;
per-rank *device* weight memory is what shrinks. Collectives go through the backend's
communicator over the tensor group, metered (`stats()`).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from diffusers.hooks import ModelHook

from .. import hooks
from .._diffusers_compat import hook_registry
from ..config import ParallelConfig
from .mesh import check_world
from .metering import MeteredCommunicator
from .tp_lora import PlacementHook, check_lora, is_peft_layer, lora_parts, move_hooks
from .tp_plans import PackedColwiseParallel, PackedRowwiseParallel, STYLES, TPPlan, supported_tp_classes, tp_plan_for
from .ulysses import split_sizes

HOOK_PREFIX = "cachedit.tp"


# -- which parameters are split how ----------------------------------------------------------------

def _pattern(path: str) -> re.Pattern:
    return re.compile("^" + re.escape(path).replace(r"\*", r"[^.]+") + "$")


def _matches(module: nn.Module, patterns) -> list[tuple[str, nn.Module, object]]:
    """(name, submodule, value) for each submodule a pattern names; the first pattern that fits wins."""
    compiled = [(_pattern(p), v) for p, v in patterns]
    found = []
    for name, sub in module.named_modules():
        for rx, value in compiled:
            if rx.match(name):
                found.append((name, sub, value))
                break
    return found


def planned_style(plan: TPPlan, path: str):
    """The style `plan` gives the module at `path` (the first pattern that fits, as `_matches`), or None."""
    return next((style for pattern, style in plan.linears if _pattern(pattern).match(path)), None)


@dataclass(frozen=True)
class ParamSplit:
    """How one parameter is cut: along `dim`, each of `blocks` split on its own into `parts`."""

    dim: int
    blocks: tuple[int, ...]

    def sizes(self, parts: int) -> list[int]:
        """This parameter's size along `dim` on each rank."""
        return [sum(split_sizes(b, parts)[r] for b in self.blocks) for r in range(parts)]

    def local(self, tensor: torch.Tensor, parts: int, rank: int) -> torch.Tensor:
        pieces = [block.tensor_split(parts, dim=self.dim)[rank] for block in tensor.split(list(self.blocks), self.dim)]
        return torch.cat(pieces, dim=self.dim).contiguous()


def _packed_blocks(style, module: nn.Module, name: str, full: int) -> tuple[int, ...]:
    attr = "_tp_packed_col_blocks" if isinstance(style, PackedColwiseParallel) else "_tp_packed_row_blocks"
    blocks = style.blocks if style.blocks is not None else getattr(module, attr, None)
    if not blocks or full % sum(blocks):
        raise ValueError(f"tensor-parallel plan: {name} is packed but has no blocks dividing its {full} features "
                         f"(pass `blocks` or set `{attr}`)")
    return tuple(b * (full // sum(blocks)) for b in blocks)


def _splits(module: nn.Module, style, name: str) -> dict[str, ParamSplit | None]:
    """Per parameter name: its ParamSplit, or None where the parameter stays whole (a row-split bias)."""
    if style == "sharded_rmsnorm":
        width = module.weight.shape[0] if getattr(module, "weight", None) is not None else 0
        return {"weight": ParamSplit(0, (width,)), "bias": ParamSplit(0, (width,))} if width else {}
    if isinstance(module, nn.Embedding) and style == "colwise":  # output features: weight columns
        return {"weight": ParamSplit(1, (module.embedding_dim,))}
    if not isinstance(module, nn.Linear):
        raise ValueError(f"tensor-parallel plan: {name} is a {type(module).__name__}; style {style!r} needs a Linear")
    out_f, in_f = module.weight.shape
    if style in ("colwise", "colwise_gather"):
        col = ParamSplit(0, (out_f,))
        return {"weight": col, "bias": col}
    if style == "rowwise":
        return {"weight": ParamSplit(1, (in_f,)), "bias": None}
    if isinstance(style, PackedColwiseParallel):
        col = ParamSplit(0, _packed_blocks(style, module, name, out_f))
        return {"weight": col, "bias": col}
    if isinstance(style, PackedRowwiseParallel):
        return {"weight": ParamSplit(1, _packed_blocks(style, module, name, in_f)), "bias": None}
    raise ValueError(f"tensor-parallel plan: unknown style {style!r} for {name}; allowed: {STYLES} or Packed*Parallel")


# -- validation ------------------------------------------------------------------------------------

def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_module(module: nn.Module, degree: int, where: str, setting: str) -> TPPlan:
    """`module` has a plan and every split it makes over `degree` ranks is possible (ValueError);
    `setting` names the config field that asked for it, e.g. "ParallelConfig.tensor=2"."""
    plan = tp_plan_for(module)
    if plan is None:
        raise ValueError(f"{setting}: no tensor-parallel plan for {where} ({type(module).__name__}); supported: "
                         f"{', '.join(supported_tp_classes())} (add one with "
                         f"cachedit.parallel.tp_plans.TP_PLANS.register)")
    for i, heads in enumerate(plan.head_counts):
        if heads % degree:
            kind = "key/value heads" if i else "attention heads"
            raise ValueError(f"{setting} splits {where} over {degree} ranks, which does not divide its {heads} "
                             f"{kind}; allowed values: {_divisors(heads)} (divisors of {heads})")
    for name, sub, style in _matches(module, plan.linears):
        for part, pname, split in ((p, n, s) for p, splits in _parts(sub, style, name, setting) for n, s in splits.items()):
            if split is None or getattr(part, pname, None) is None:
                continue
            packed = len(split.blocks) > 1 or isinstance(style, (PackedColwiseParallel, PackedRowwiseParallel))
            bad = [b for b in split.blocks if (b % degree if packed else b < degree)]
            if bad:
                need = "divisible by" if packed else "at least"
                raise ValueError(f"{setting}: {where}.{name}.{pname} splits blocks {list(split.blocks)} over "
                                 f"{degree} ranks; each must be {need} {degree}")
    if not plan.reduce:
        raise ValueError(f"tensor-parallel plan for {type(module).__name__} names no reduce points")
    return plan


def check_tensor_parallel(transformers: dict[str, nn.Module], config: ParallelConfig,
                          text_encoders: dict[str, nn.Module] | None = None) -> None:
    """Every check that can fail before tensor-parallel plans are applied to the transformers (when
    `config.tensor > 1`) and to `text_encoders` (ValueError). The model checks come first, so they
    answer the same with or without a process group."""
    if config.tensor > 1:
        for name, t in transformers.items():
            plan = check_module(t, config.tensor, f"pipe.{name}", f"ParallelConfig.tensor={config.tensor}")
            local = min(plan.head_counts, default=config.ulysses * config.tensor) // config.tensor
            if local < config.ulysses:
                raise ValueError(f"ParallelConfig.ulysses={config.ulysses} exceeds the {local} heads each "
                                 f"tensor-parallel rank of pipe.{name} holds; allowed: ulysses <= {local} (use ring "
                                 "for the rest)")
    if text_encoders is not None:
        if not text_encoders:
            raise ValueError("ParallelConfig.text_encoder=True but the pipeline has no text encoder loaded; "
                             "allowed: False (e.g. when passing prompt_embeds)")
        for name, encoder in text_encoders.items():
            check_module(encoder, config.world_size, f"pipe.{name}", "ParallelConfig.text_encoder=True")
    check_world(config)


# -- hooks -----------------------------------------------------------------------------------------

class ReduceHook(ModelHook):
    """Sums the module's outputs across the group in one all-reduce: the row-split partial sums
    meet here. `outputs` picks which (by index); None means every tensor it returns."""

    def __init__(self, comm, outputs: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.comm = comm
        self.outputs = outputs

    def post_forward(self, module, output):
        single = torch.is_tensor(output)
        out = [output] if single else list(output)
        where = [i for i, o in enumerate(out) if torch.is_tensor(o) and (self.outputs is None or i in self.outputs)]
        flat = torch.cat([out[i].reshape(-1) for i in where]) if len(where) > 1 else out[where[0]].reshape(-1)
        summed = self.comm.all_reduce(flat, "sum").split([out[i].numel() for i in where])
        for i, s in zip(where, summed):
            out[i] = s.view(out[i].shape)
        return out[0] if single else type(output)(out)


class ColumnGatherHook(ModelHook):
    """All-gathers a column-split output along its last dim (shares may differ by one: padded)."""

    def __init__(self, comm, sizes: list[int]) -> None:
        super().__init__()
        self.comm = comm
        self.sizes = sizes

    def post_forward(self, module, output):
        width = max(self.sizes)
        if output.shape[-1] < width:
            output = torch.nn.functional.pad(output, (0, width - output.shape[-1]))
        full = self.comm.all_gather(output.contiguous(), dim=-1)
        if len(set(self.sizes)) == 1:
            return full
        return torch.cat([p[..., :s] for p, s in zip(full.split(width, dim=-1), self.sizes)], dim=-1)


class ShardedRMSNormHook(ModelHook):
    """RMSNorm over a width split across the group: the sum of squares is all-reduced, the weight is
    this rank's share. Matches torch.nn.RMSNorm and diffusers' RMSNorm (float32 statistic)."""

    def __init__(self, comm, width: int) -> None:
        super().__init__()
        self.comm = comm
        self.width = width

    def new_forward(self, module, hidden_states):
        dtype = hidden_states.dtype
        squares = hidden_states.float().pow(2).sum(-1, keepdim=True)
        mean = self.comm.all_reduce(squares, "sum") / self.width
        eps = module.eps if module.eps is not None else torch.finfo(dtype).eps
        out = hidden_states.float() * torch.rsqrt(mean + eps)
        if getattr(module, "weight", None) is not None:
            out = out * module.weight.float()
        if getattr(module, "bias", None) is not None:
            out = out + module.bias.float()
        return out.to(dtype)


# -- apply / remove --------------------------------------------------------------------------------

@dataclass
class TensorParallel:
    """One module's tensor-parallel plan as applied: what was replaced, so it can be put back."""

    module: nn.Module
    plan: TPPlan
    comm: MeteredCommunicator
    params: list = field(default_factory=list)  # (module, name, original Parameter or None, its device)
    attrs: list = field(default_factory=list)  # (module, name, original value)
    attached: list = field(default_factory=list)  # (module, hook name)
    per_call: dict = field(default_factory=dict)  # collective -> calls per forward of the module

    def stats(self) -> dict:
        """Bytes this rank sent and calls made, per collective."""
        return {"bytes": dict(self.comm.sent), "calls": dict(self.comm.calls)}

    def reset_stats(self) -> None:
        self.comm.reset()


def _replace_param(tp: TensorParallel, module: nn.Module, name: str, new: torch.Tensor | None,
                   device: torch.device | None = None) -> None:
    """`new` (on `device`, default: the old parameter's) in place of `module.name`; the old one waits on the host."""
    old = getattr(module, name)
    device = old.device if device is None else device
    if old.device.type not in ("cpu", "meta"):  # the original waits on the host for disable()
        old.data = old.data.to("cpu")
    tp.params.append((module, name, old, device))
    setattr(module, name, None if new is None else nn.Parameter(new.to(device), requires_grad=old.requires_grad))


def _set_attr(tp: TensorParallel, obj, name: str, value) -> None:
    tp.attrs.append((obj, name, getattr(obj, name)))
    setattr(obj, name, value)


def _attach(tp: TensorParallel, module: nn.Module, hook: ModelHook, kind: str) -> None:
    name = f"{HOOK_PREFIX}.{kind}"
    hooks.attach(module, hook, name)
    tp.attached.append((module, name))


def _parts(sub: nn.Module, style, name: str, setting: str) -> list[tuple[nn.Module, dict]]:
    """The modules a planned linear's split reaches, with their splits: itself, or, under a peft LoRA
    layer, its base layer and each adapter's A or B (`tp_lora.py`)."""
    if not is_peft_layer(sub):
        return [(sub, _splits(sub, style, name))]
    check_lora(sub, style, name, setting)
    return lora_parts(sub, style, _splits(sub.base_layer, style, name))


def _shard(tp: TensorParallel, sub: nn.Module, splits: dict, degree: int, rank: int, device=None) -> None:
    for pname, split in splits.items():
        param = getattr(sub, pname, None)
        if param is None:
            continue
        if split is None:  # a row-split bias: added once, by the first rank only
            if rank != 0:
                _replace_param(tp, sub, pname, None, device)
        else:
            _replace_param(tp, sub, pname, split.local(param.detach(), degree, rank), device)
    if isinstance(sub, nn.Linear):
        _set_attr(tp, sub, "out_features", sub.weight.shape[0])
        _set_attr(tp, sub, "in_features", sub.weight.shape[1])
    elif isinstance(sub, nn.Embedding):
        _set_attr(tp, sub, "embedding_dim", sub.weight.shape[1])


def _shard_all(tp: TensorParallel, device=None) -> list[tuple[nn.Module, object, dict]]:
    """Cut every planned linear (with the LoRA layers on it) and set the local head counts; returns
    (linear, style, its splits) per planned linear. `device`: where the shards go (default: where the
    weights are)."""
    degree, rank = tp.comm.world_size, tp.comm.rank
    planned = []
    for name, sub, style in _matches(tp.module, tp.plan.linears):
        parts = _parts(sub, style, name, "ParallelConfig.tensor")
        for part, splits in parts:
            _shard(tp, part, splits, degree, rank, device)
        if is_peft_layer(sub):  # the wrapper's own record of its base layer's shape
            _set_attr(tp, sub, "out_features", sub.base_layer.out_features)
            _set_attr(tp, sub, "in_features", sub.base_layer.in_features)
            if device is not None:  # adapters loaded on the host (`unsharded`): A or B whole, not cut above
                sub.to(device)
        planned.append((sub, style, parts[0][1]))
    for _, sub, attr in _matches(tp.module, tp.plan.head_attrs()):
        _set_attr(tp, sub, attr, getattr(sub, attr) // degree)
    return planned


def apply_tensor_parallel(module: nn.Module, plan: TPPlan, comm: MeteredCommunicator) -> TensorParallel:
    """Shard `module` over `comm`'s ranks by `plan` (validated by `check_module` first)."""
    degree = comm.world_size
    tp = TensorParallel(module, plan, comm, per_call={"all_reduce": 0, "all_gather": 0})
    try:
        with torch.no_grad():
            for sub, style, splits in _shard_all(tp):
                if style == "colwise_gather":
                    _attach(tp, sub, ColumnGatherHook(comm, splits["weight"].sizes(degree)), "gather")
                    tp.per_call["all_gather"] += 1
                elif style == "sharded_rmsnorm":
                    width = tuple(getattr(sub, "normalized_shape", None) or sub.dim)[-1]  # torch's / diffusers'
                    _attach(tp, sub, ShardedRMSNormHook(comm, width), "norm")
                    tp.per_call["all_reduce"] += 1
            for _, sub, outputs in _matches(module, plan.reduce_points()):
                _attach(tp, sub, ReduceHook(comm, outputs), "reduce")
                tp.per_call["all_reduce"] += 1
            # Always: a LoRA loaded after accelerate (`unsharded`) and unloaded then needs it too.
            _attach(tp, module, PlacementHook(tp), "placement")
    except BaseException:
        remove_tensor_parallel(tp)
        raise
    return tp


def _restore(tp: TensorParallel, to_device: bool) -> torch.device | None:
    """The original parameters and attributes back, last-first; `to_device`: each original onto the
    device its shard was on (else it stays where it waits). Returns the shards' device."""
    device = tp.params[0][3] if tp.params else None
    for obj, name, value in reversed(tp.attrs):
        setattr(obj, name, value)
    with torch.no_grad():
        for module, name, original, where in reversed(tp.params):
            if to_device and original.device != where:
                original.data = original.data.to(where)
            setattr(module, name, original)
    tp.attrs.clear()
    tp.params.clear()
    return device


def remove_tensor_parallel(tp: TensorParallel) -> None:
    """Undo `apply_tensor_parallel` exactly: hooks off, the original Parameter objects and attributes back."""
    for module, name in reversed(tp.attached):
        hooks.detach(module, name)
    tp.attached.clear()
    _restore(tp, to_device=True)


@contextmanager
def unsharded(tp: TensorParallel):
    """`with unsharded(tp):` the whole weights are back in the model (where the originals wait: the
    host, off the CPU, so no device holds the whole model) and its attributes whole, hooks left in
    place; on leaving, the model is cut again, new peft LoRA layers included (`tp_lora.py`), and a
    tensor-parallel hook whose module peft wrapped meanwhile moves onto the wrapper. For loading a
    LoRA after accelerate (`tp_load.py`); no forward may run inside."""
    paths = {id(m): n for n, m in tp.module.named_modules()}
    hooked = [(paths.get(id(m)), m) for m, _ in tp.attached]
    device = _restore(tp, to_device=False)
    try:
        yield tp
    finally:
        with torch.no_grad():
            _shard_all(tp, device)
        for path, module in hooked:
            current = tp.module.get_submodule(path) if path is not None else module
            if current is not module and is_peft_layer(current) and current.base_layer is module:
                move_hooks(tp, module, current)
        for module, name in tp.attached:
            hook = hook_registry(module).hooks[name]
            if isinstance(hook, PlacementHook):
                hook.refresh()


# -- text encoders ---------------------------------------------------------------------------------

def text_encoders_of(pipe) -> dict[str, nn.Module]:
    """The pipeline's text encoders by component name (text_encoder, text_encoder_2, ...)."""
    components = getattr(pipe, "components", None) or {}
    return {n: m for n, m in components.items() if n.startswith("text_encoder") and isinstance(m, nn.Module)}
