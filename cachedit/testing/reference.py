"""Small, *really trained* pipelines for caching research and tests: a FLUX one and an SD3 one.

Random-weight tiny pipelines (:mod:`cachedit.testing.tiny`) exercise code paths, but their denoising trajectories are
meaningless: every step differs from the previous one about as much as two random vectors, so caching heuristics
(first-block residual thresholds, TeaCache, ...) cannot be evaluated on them. The reference model shipped in
``cachedit/testing/reference_model/`` is a standard :class:`diffusers.FluxPipeline` whose
``FluxTransformer2DModel`` was trained with rectified flow matching on scikit-learn's bundled handwritten digits
(``sklearn.datasets.load_digits``: 1797 images of 8x8 pixels, 16 gray levels), conditioned on the prompts
``"a handwritten digit 0"`` ... ``"a handwritten digit 9"`` (see :func:`digit_prompt`) through the pipeline's own
tokenizers and tiny CLIP / T5 text encoders (those of :mod:`cachedit.testing.tiny`, fine-tuned along). Every FLUX
adapter applies to it unchanged. 2.78M transformer parameters, 3.03M in all, 11.6 MiB of float32 safetensors.

* images: 32x32 RGB (gray digits: the 8x8 digits upsampled bilinearly, white ink on black), values in [0, 1] with
  ``output_type="pt"``;
* VAE: a small ``AutoencoderKL`` trained for reconstruction (scale factor 2, 4 latent channels): 16x16x4 latents,
  packed 2x2 into 64 image tokens of 16 channels;
* transformer: ``FluxTransformer2DModel`` with 2 double-stream + 6 single-stream blocks, 4 heads of dim 32, no guidance
  embedding; text: the T5 tokens (24 with ``max_sequence_length=24``) + the pooled CLIP embedding;
* scheduler: ``FlowMatchEulerDiscreteScheduler`` with ``shift=1.0`` and no dynamic shifting (the pipeline's ``mu`` is
  ignored), as in training;
* trained with 10% prompt dropout to the empty prompt: :func:`reference_call_kwargs` uses true classifier-free
  guidance (``negative_prompt=""``, ``true_cfg_scale=2.0``: 2 transformer calls per step, "cond" and "uncond");
* fine-tuned with padding-length augmentation (T5 ``max_sequence_length`` drawn from 24 ... 512 per step), so that
  diffusers' defaults work too: ``FluxPipeline`` pads the prompt to 512 T5 tokens by default and passes no attention
  mask. A plain call gives the digit::

      pipe = diffusers.DiffusionPipeline.from_pretrained(REFERENCE_MODEL_DIR)
      pipe("a handwritten digit 7", height=32, width=32).images[0]

  :func:`reference_call_kwargs` keeps ``max_sequence_length=24`` (88 instead of 576 tokens per transformer call).

Measured (``scripts/train_reference.py --check-only``; seeds 0-3, digits 0-9, logistic regression on the data set),
digits recognised out of 40:

* T5 length 24 (:func:`reference_call_kwargs`): 40 with CFG 2.0, 34 without, at 28 and at 12 steps;
* T5 length 512 (diffusers' default): 38 with CFG 2.0 at 28 and at 12 steps; 33 (28 steps) and 34 (12 steps) without.

The plain call above for ``"a handwritten digit 7"`` (every argument but the size at diffusers' defaults: T5 length
512, 28 steps), seeds 0-19: 20/20 recognised with ``negative_prompt="", true_cfg_scale=2``, 18/20 without CFG.

(Before the fine-tune: 39 and 35 at length 24 and 28 steps; 1/20 for that call with CFG.) The relative L1 change of
the first block's output residual between consecutive steps has a median of 0.14 (16 steps; 0.39 with random weights).

Reproduce with ``scripts/train_reference.py``: from scratch, then the fine-tune (commands in its docstring).

The second reference model, ``cachedit/testing/reference_model_sd3/`` (``reference_pipeline(family="sd3")``), is a
standard :class:`diffusers.StableDiffusion3Pipeline`, another family with CFG as SD3 does it: one transformer call per
step on the batch [uncond, cond], mixed with ``guidance_scale``. Same data, prompts and VAE (the first model's,
copied), the first model's tokenizers (both CLIP slots share the CLIP one), two ``CLIPTextModelWithProjection`` and a
``T5EncoderModel`` (d_model 64) trained along; ``SD3Transformer2DModel`` with 6 joint blocks, 4 heads x 32, RMS
qk-norm, 2x2 patches over the 16x16x4 latents (64 image tokens; text: 16 CLIP + 24 T5 tokens with
:func:`reference_call_kwargs`); ``FlowMatchEulerDiscreteScheduler`` with ``shift=1.0``. 3.47M transformer
parameters, 3.83M in all, 14.9 MiB of float32 safetensors. Trained with 15% prompt dropout to ``""`` and T5
padding-length augmentation (1 step in 4 at the pipeline's default 256), in 18.2 minutes on one shared CPU core
(``scripts/train_reference_sd3.py``, 1200 steps, the record in ``training.json``). ``transformer.config.sample_size``
is 16, so the pipeline's default size is the native 32x32 and a plain call gives the digit::

    pipe = diffusers.DiffusionPipeline.from_pretrained(REFERENCE_SD3_MODEL_DIR)
    pipe("a handwritten digit 7").images[0]  # 28 steps, guidance_scale 7, T5 length 256

Measured (``scripts/train_reference_sd3.py --check-only``; seeds 0-3, digits 0-9), recognised out of 40:

* T5 length 24 (:func:`reference_call_kwargs`, ``guidance_scale`` 4.0 by default): 40 with CFG 4, 38 with CFG 3,
  38 with CFG 2, 31 without CFG at 28 steps; 40, 40, 38 and 32 at 12 steps;
* diffusers' defaults (T5 length 256, 28 steps): 40 with their ``guidance_scale`` 7, 38 with 3, 31 without CFG;
  the plain call above for ``"a handwritten digit 7"``, seeds 0-19: 20/20 with guidance_scale 7, 18/20 without.

The first block's output residual (the cond half of the batch) changes by a median relative L1 of 0.14 per step at
16 steps and 0.09 at 28 steps; 0.42 and 0.46 with a random transformer of the same config.
"""

from __future__ import annotations

import pathlib

import diffusers
import torch

__all__ = [
    "REFERENCE_FAMILIES",
    "REFERENCE_MODEL_DIR",
    "REFERENCE_SD3_MODEL_DIR",
    "digit_classifier",
    "digit_features",
    "digit_images",
    "digit_prompt",
    "reference_call_kwargs",
    "reference_pipeline",
]

REFERENCE_MODEL_DIR: pathlib.Path = pathlib.Path(__file__).resolve().parent / "reference_model"
REFERENCE_SD3_MODEL_DIR: pathlib.Path = pathlib.Path(__file__).resolve().parent / "reference_model_sd3"
REFERENCE_FAMILIES: tuple[str, ...] = ("flux", "sd3")
REFERENCE_MODEL_DIRS: dict[str, pathlib.Path] = {"flux": REFERENCE_MODEL_DIR, "sd3": REFERENCE_SD3_MODEL_DIR}
DEFAULT_CFG_SCALES: dict[str, float] = {"flux": 2.0, "sd3": 4.0}

IMAGE_SIZE = 32  # pixels; the 8x8 digits are upsampled 4x
MAX_SEQUENCE_LENGTH = 24  # "a handwritten digit 7" is 19 tokens with the tiny T5 tokenizer


def digit_prompt(d: int) -> str:
    """The prompt the reference model was trained on for digit ``d`` (0-9): ``"a handwritten digit 7"``."""
    if not 0 <= int(d) <= 9:
        raise ValueError(f"digit must be in 0..9, got {d!r}")
    return f"a handwritten digit {int(d)}"


def _check_family(family: str) -> None:
    if family not in REFERENCE_FAMILIES:
        raise ValueError(f"family must be one of {', '.join(map(repr, REFERENCE_FAMILIES))}, got {family!r}")


def reference_pipeline(
    dtype: torch.dtype = torch.float32, path: str | pathlib.Path | None = None, *, family: str = "flux"
) -> diffusers.DiffusionPipeline:
    """Loads the shipped reference pipeline of ``family`` (``"flux"``: :class:`diffusers.FluxPipeline`, ``"sd3"``:
    :class:`diffusers.StableDiffusion3Pipeline`), or the one at ``path``: offline, on CPU, progress bar disabled."""
    _check_family(family)
    cls = diffusers.FluxPipeline if family == "flux" else diffusers.StableDiffusion3Pipeline
    pipe = cls.from_pretrained(str(path or REFERENCE_MODEL_DIRS[family]), dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_call_kwargs(
    num_inference_steps: int = 28, seed: int = 0, *, true_cfg_scale: float | None = None, family: str = "flux"
) -> dict:
    """Keyword arguments (besides the prompt) for a deterministic sample of the reference pipeline of ``family``.

    Classifier-free guidance with the empty negative prompt (both models were trained with prompt dropout to ``""``).
    ``true_cfg_scale`` is the guidance scale (default: 2.0 for ``"flux"``, 4.0 for ``"sd3"``); 1.0 turns it off.

    * ``"flux"``: true CFG (``negative_prompt=""``, ``true_cfg_scale``): every step makes 2 transformer calls, in the
      ``"cond"`` and ``"uncond"`` cache contexts; without it ~85% instead of 100% of the digits are recognised.
    * ``"sd3"``: ``guidance_scale`` (SD3's CFG; the negative prompt defaults to ``""``): 1 transformer call per step on
      a batch of 2, uncond then cond; without it far fewer digits are recognised (see the module docstring).
    """
    _check_family(family)
    if true_cfg_scale is None:
        true_cfg_scale = DEFAULT_CFG_SCALES[family]
    kwargs = dict(
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        num_inference_steps=num_inference_steps,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pt",
    )
    if family == "sd3":
        kwargs.update(guidance_scale=max(true_cfg_scale, 1.0))  # <= 1: no CFG, 1 call on a batch of 1
        return kwargs
    kwargs.update(guidance_scale=1.0)  # no guidance embedding: ignored by the transformer
    if true_cfg_scale > 1.0:
        kwargs.update(negative_prompt="", true_cfg_scale=true_cfg_scale)
    return kwargs


def digit_images(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """The training data: ``load_digits`` as (N, 3, size, size) float32 images in [-1, 1] (gray, replicated to RGB,
    upsampled bilinearly) and the (N,) int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x * 2 - 1).clamp(-1, 1).expand(-1, 3, -1, -1).contiguous()
    return x, torch.tensor(data.target, dtype=torch.int64)


def digit_features(images: torch.Tensor) -> torch.Tensor:
    """(N, 64) features on load_digits' scale (0..16) from images in [0, 1] (pipeline ``output_type="pt"``):
    channel mean, average-pooled to 8x8. Applied to :func:`digit_images` (mapped to [0, 1]) it recovers about the
    original digits, so a classifier trained on its output of the data set classifies generated images."""
    x = images.float().mean(dim=1, keepdim=True)
    x = torch.nn.functional.adaptive_avg_pool2d(x, (8, 8))
    return (x * 16.0).flatten(1)


def digit_classifier():
    """A scikit-learn ``LogisticRegression`` fitted on :func:`digit_features` of the data set (~0.3 s): ``predict``
    on ``digit_features(pipe(...).images)`` tells which digit a generated image shows.

    Fitted with 1 BLAS / OpenMP thread: on a busy 2-core machine the default thread pools make the fit ~100x slower.
    """
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    images, labels = digit_images()
    with threadpool_limits(1):
        return LogisticRegression(max_iter=2000).fit(digit_features((images + 1) / 2).numpy(), labels.numpy())
