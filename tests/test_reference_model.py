"""The shipped reference model (cachedit.testing.reference) is really trained: it draws the prompted digits, and its
denoising trajectory is smooth enough for step caching to make sense."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cachedit.testing.reference import (
    REFERENCE_MODEL_DIR,
    digit_classifier,
    digit_features,
    digit_prompt,
    reference_call_kwargs,
    reference_pipeline,
)

STEPS = 16
# The shipped model: 10/10 here (seed 0, 16 steps, true CFG 2.0); 40/40 over seeds 0..3 at 12 and at 28 steps (see
# `python scripts/train_reference.py --out cachedit/testing/reference_model --check-only`). 8/10 leaves margin for
# numerical differences across CPUs / torch versions.
MIN_CORRECT = 8
# Median relative L1 change of the first block's output residual between consecutive steps: ~0.4 with random
# weights (0.39 for this architecture); the shipped model gives 0.14 (16 steps, "cond" calls).
MAX_MEDIAN_RESIDUAL_DIFF = 0.2
# diffusers' defaults (max_sequence_length 512, no CFG) at 12 steps: 10/10 for seed 0 (8/10 for seed 1; 34/40 over
# seeds 0..3, see cachedit.testing.reference). The model before its padding-length fine-tune: 0/10 here.
DEFAULTS_STEPS = 12
MIN_CORRECT_DEFAULTS = 8


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return reference_pipeline()


@pytest.fixture(scope="module")
def generated(pipe):
    """Digits 0..9 (one batch, seed 0, 16 steps, true CFG) and the first-block residuals of every transformer call
    (2 per step: "cond" then "uncond")."""
    residuals = []

    def hook(module, args, kwargs, output):
        hidden_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        hidden_out = output[1] if isinstance(output, tuple) else output  # (encoder_hidden_states, hidden_states)
        residuals.append((hidden_out - hidden_in).detach().clone())

    handle = pipe.transformer.transformer_blocks[0].register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            images = pipe(prompt=[digit_prompt(d) for d in range(10)], **reference_call_kwargs(STEPS, seed=0)).images
    finally:
        handle.remove()
    return images, residuals


def test_layout():
    index = json.loads((REFERENCE_MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"):
        assert (REFERENCE_MODEL_DIR / name).is_dir(), name
    size = sum(f.stat().st_size for f in REFERENCE_MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, size


def test_generates_prompted_digits(generated):
    images, _ = generated
    assert images.shape == (10, 3, 32, 32)
    assert torch.isfinite(images).all()
    pred = digit_classifier().predict(digit_features(images).numpy())
    correct = int((pred == np.arange(10)).sum())
    print(f"predicted digits: {pred.tolist()} ({correct}/10 correct)")
    assert correct >= MIN_CORRECT, pred.tolist()


def test_first_block_residual_changes_slowly(generated):
    _, residuals = generated
    assert len(residuals) == 2 * STEPS  # true CFG: cond, uncond, cond, uncond, ...
    cond = residuals[0::2]
    diffs = [((cur - prev).abs().mean() / prev.abs().mean()).item() for prev, cur in zip(cond, cond[1:])]
    median = float(np.median(diffs))
    print(f"first-block residual rel. L1 change per step: median {median:.3f}, " + " ".join(f"{d:.3f}" for d in diffs))
    assert median < MAX_MEDIAN_RESIDUAL_DIFF, diffs


def test_plain_diffusers_defaults_give_prompted_digits():
    """A user's first call: ``DiffusionPipeline.from_pretrained`` and the pipeline's defaults (T5 padded to 512 tokens,
    no attention mask, no CFG) at the native 32x32 size. The model was fine-tuned with padding-length augmentation."""
    import diffusers

    torch.set_num_threads(1)
    pipe = diffusers.DiffusionPipeline.from_pretrained(REFERENCE_MODEL_DIR)
    assert isinstance(pipe, diffusers.FluxPipeline)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = pipe(
            [digit_prompt(d) for d in range(10)],
            height=32,
            width=32,
            num_inference_steps=DEFAULTS_STEPS,
            generator=torch.Generator("cpu").manual_seed(0),
        ).images  # PIL images, as a user gets them
    pixels = torch.tensor(np.stack([np.asarray(image) for image in images]), dtype=torch.float32) / 255.0
    pred = digit_classifier().predict(digit_features(pixels.permute(0, 3, 1, 2)).numpy())
    correct = int((pred == np.arange(10)).sum())
    print(f"predicted digits (max_sequence_length 512, no CFG): {pred.tolist()} ({correct}/10 correct)")
    assert correct >= MIN_CORRECT_DEFAULTS, pred.tolist()
