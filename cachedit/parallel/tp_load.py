"""A LoRA loaded after a tensor-parallel `accelerate`: checked, loaded into the whole model, cut again.

peft sizes a new adapter's A / B by the linear it wraps; on a sharded linear those are the shard's
sizes, so a LoRA file's A / B do not fit (and FLUX's loader would widen a row-split linear to the
file's width). So while tensor parallelism is applied, this pipeline's `load_lora_weights` (an
attribute of the instance, removed by `disable`) first reads the file's keys and refuses what
`tp_lora.py` cannot shard (ValueError, nothing loaded), then loads with every sharded model whole
again (`tensor.unsharded`: the original weights, which wait on the host off the CPU, so no device
holds the whole model) and cuts it once more, the new A / B included, as a LoRA loaded before.
A sharded model's own `load_lora_adapter` called directly (not through the pipeline) is refused.
"""

from __future__ import annotations

import functools
from contextlib import ExitStack

from .tensor import TensorParallel, planned_style, unsharded
from .tp_lora import is_peft_layer, refuse_lora

LOADER = "load_lora_weights"
MODEL_LOADER = "load_lora_adapter"


def _field(name: str, tp: TensorParallel) -> str:
    """The setting that sharded component `name`."""
    if name.startswith("text_encoder"):
        return "ParallelConfig.text_encoder=True"
    return f"ParallelConfig.tensor={tp.comm.world_size}"


def check_lora_keys(state_dict: dict, parts: dict[str, TensorParallel]) -> None:
    """Raise ValueError where a LoRA with these (diffusers-format, component-prefixed) keys would land
    on a planned module that cannot be sharded with it."""
    layers: dict[tuple[str, str], set[str]] = {}
    for key in state_dict:
        head, sep, tail = key.partition(".lora_")
        component, _, path = head.partition(".")
        if sep and component in parts:
            layers.setdefault((component, path), set()).add(tail)
    for (component, path), tails in layers.items():
        tp = parts[component]
        style = planned_style(tp.plan, path)
        if style is None:
            continue  # a whole linear: its LoRA stays whole too
        try:
            module = tp.module.get_submodule(path)
        except AttributeError:
            continue  # not this model's layout: diffusers says so
        base = module.base_layer if is_peft_layer(module) else module
        refuse_lora(style, base, any(t.startswith("embedding_") for t in tails),
                    any(t.startswith("magnitude_vector") for t in tails), "B.bias" in tails,
                    f"{component}.{path}", f"{_field(component, tp)} (pipe.load_lora_weights after accelerate)")


def _read(pipe, source, kwargs: dict) -> dict:
    """The LoRA's state dict as the pipeline's loader sees it (a dict source is copied, not changed)."""
    skip = ("adapter_name", "hotswap", "low_cpu_mem_usage")
    source = dict(source) if isinstance(source, dict) else source
    out = pipe.lora_state_dict(source, **{k: v for k, v in kwargs.items() if k not in skip})
    return out[0] if isinstance(out, tuple) else out


def install(pipe, parts: dict[str, TensorParallel]):
    """Wrap `pipe.load_lora_weights` (and refuse the models' direct `load_lora_adapter`) while `parts`
    are sharded; returns the undo."""
    original = getattr(pipe, LOADER, None)
    if original is None:
        return lambda: None
    inside = []  # non-empty while the wrapped loader runs

    @functools.wraps(original)
    def load_lora_weights(pretrained_model_name_or_path_or_dict, *args, **kwargs):
        check_lora_keys(_read(pipe, pretrained_model_name_or_path_or_dict, kwargs), parts)
        inside.append(True)
        try:
            with ExitStack() as stack:
                for tp in parts.values():
                    stack.enter_context(unsharded(tp))
                return original(pretrained_model_name_or_path_or_dict, *args, **kwargs)
        finally:
            inside.pop()

    undo = [_set(pipe, LOADER, load_lora_weights)]
    for name, tp in parts.items():
        model_loader = getattr(tp.module, MODEL_LOADER, None)
        if model_loader is not None:
            undo.append(_set(tp.module, MODEL_LOADER, _refusing(model_loader, name, tp, inside)))
    return lambda: [u() for u in reversed(undo)]


def _refusing(model_loader, name: str, tp: TensorParallel, inside: list):
    @functools.wraps(model_loader)
    def load_lora_adapter(*args, **kwargs):
        if not inside:
            raise ValueError(f"{_field(name, tp)}: pipe.{name}.load_lora_adapter after accelerate "
                             f"loads full-size A / B into sharded linears; allowed: pipe.load_lora_weights (which "
                             f"re-shards), or loading before accelerate")
        return model_loader(*args, **kwargs)

    return load_lora_adapter


def _set(obj, attr: str, value):
    """An instance attribute shadowing the class's method; the undo puts back what was there."""
    had = attr in vars(obj)
    before = vars(obj).get(attr)
    setattr(obj, attr, value)

    def undo():
        if had:
            setattr(obj, attr, before)
        else:
            vars(obj).pop(attr, None)

    return undo
