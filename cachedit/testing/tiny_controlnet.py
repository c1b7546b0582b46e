"""Tiny, offline ControlNet pipelines for tests: the tiny pipeline of a family plus a ControlNet.

``flux``
    :class:`diffusers.FluxControlNetPipeline`: the ``tiny_pipeline("flux")`` components and a ``FluxControlNetModel``
    (1 double + 1 single block) made from its transformer with ``from_transformer``. diffusers zero-initialises the
    ControlNet's input and output projections (so a fresh ControlNet changes nothing); here they get small random
    weights, so the residuals move the output and a test comparing outputs can fail. The control image is a seeded
    random 32x32 image, the pipeline's size.
"""

from __future__ import annotations

import diffusers
import torch

from .tiny import tiny_call_kwargs, tiny_pipeline

CONTROLNET_FAMILIES: tuple[str, ...] = ("flux",)


def _check_family(family: str) -> None:
    if family not in CONTROLNET_FAMILIES:
        raise ValueError(f"Unknown tiny ControlNet family {family!r}; allowed values: {', '.join(CONTROLNET_FAMILIES)}")


def _randomize_zero_init(controlnet: torch.nn.Module) -> None:
    for name, param in controlnet.named_parameters():
        if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
            torch.nn.init.normal_(param, std=0.05)


def tiny_controlnet_pipeline(family: str = "flux", *, seed: int = 0) -> diffusers.DiffusionPipeline:
    """The ControlNet pipeline of ``family`` (CPU, float32, progress bars off); deterministic in ``seed``,
    leaving the global torch RNG untouched."""
    _check_family(family)
    base = tiny_pipeline(family, seed=seed)
    cfg = base.transformer.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        controlnet = diffusers.FluxControlNetModel.from_transformer(
            base.transformer, num_layers=1, num_single_layers=1, attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads)
        _randomize_zero_init(controlnet)
    pipe = diffusers.FluxControlNetPipeline(**base.components, controlnet=controlnet.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_controlnet_call_kwargs(family: str = "flux", *, num_inference_steps: int = 4, seed: int = 0) -> dict:
    """``tiny_call_kwargs(family)`` plus a seeded control image of the pipeline's size and its scale."""
    _check_family(family)
    kwargs = tiny_call_kwargs(family, num_inference_steps=num_inference_steps, seed=seed)
    generator = torch.Generator("cpu").manual_seed(seed + 7)
    kwargs.update(control_image=torch.rand(1, 3, kwargs["height"], kwargs["width"], generator=generator),
                  controlnet_conditioning_scale=1.0)
    return kwargs
