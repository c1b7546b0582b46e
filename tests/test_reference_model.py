"""The shipped reference model (cachedit.testing.reference) is really trained: it draws the prompted digits, and its
denoising trajectory is smooth enough for step caching to make sense."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cachedit.testing.reference import (
    REFERENCE_MODEL_DIR,
    REFERENCE_SD3_MODEL_DIR,
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


# ---------------------------------------------------------------------------------------------------------------
# The second reference model: StableDiffusion3Pipeline, CFG batched in one call (cachedit/testing/reference_model_sd3)
# ---------------------------------------------------------------------------------------------------------------

SD3_STEPS = 16
SD3_SEEDS = range(4)
# The shipped model at 16 steps, seeds 0-3, digits 0-9: 40/40 recognised with CFG (guidance_scale 4), 33/40 without
# (guidance_scale 1); at 28 steps 40/40 and 31/40 (scripts/train_reference_sd3.py --check-only). The bounds leave
# margin for numerical differences across CPUs / torch versions.
SD3_MIN_CORRECT_CFG = 37
SD3_MIN_CFG_GAIN = 3


@pytest.fixture(scope="module")
def sd3_pipe():
    torch.set_num_threads(1)
    return reference_pipeline(family="sd3")


def _first_block_residuals(pipe, kwargs, prompts):
    """Images and the first block's output residual of every transformer call (SD3: one call per step, on the batch
    [uncond, cond] with CFG)."""
    residuals = []

    def hook(module, args, kwargs, output):
        residuals.append((output[1] - kwargs["hidden_states"]).detach().clone())  # (encoder_hidden_states, hidden)

    handle = pipe.transformer.transformer_blocks[0].register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            images = pipe(prompt=prompts, **kwargs).images
    finally:
        handle.remove()
    return images, residuals


def _median_rel_l1_change(residuals):
    diffs = [((cur - prev).abs().mean() / prev.abs().mean()).item() for prev, cur in zip(residuals, residuals[1:])]
    return float(np.median(diffs)), diffs


def _recognised(images) -> int:
    pred = digit_classifier().predict(digit_features(images).numpy())
    print(f"predicted digits: {pred.tolist()}")
    return int((pred == np.arange(10)).sum())


@pytest.fixture(scope="module")
def sd3_generated(sd3_pipe):
    prompts = [digit_prompt(d) for d in range(10)]
    return _first_block_residuals(sd3_pipe, reference_call_kwargs(SD3_STEPS, seed=0, family="sd3"), prompts)


def test_sd3_layout_and_from_pretrained():
    import diffusers

    index = json.loads((REFERENCE_SD3_MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    size = sum(f.stat().st_size for f in REFERENCE_SD3_MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, size
    assert (REFERENCE_SD3_MODEL_DIR / "training.json").is_file()
    pipe = diffusers.DiffusionPipeline.from_pretrained(REFERENCE_SD3_MODEL_DIR)
    assert isinstance(pipe, diffusers.StableDiffusion3Pipeline)
    # The pipeline's default size is the native 32x32; the scheduler samples as the model was trained.
    assert pipe.default_sample_size * pipe.vae_scale_factor == 32
    assert pipe.scheduler.config.shift == 1.0 and not pipe.scheduler.config.use_dynamic_shifting


def test_sd3_cfg_gives_prompted_digits_and_helps(sd3_pipe, sd3_generated):
    images, _ = sd3_generated
    assert images.shape == (10, 3, 32, 32) and torch.isfinite(images).all()
    counts = {}
    for scale in (None, 1.0):  # the family's default CFG scale, then none
        counts[scale] = 0
        for seed in SD3_SEEDS:
            kwargs = reference_call_kwargs(SD3_STEPS, seed=seed, true_cfg_scale=scale, family="sd3")
            with torch.no_grad():
                counts[scale] += _recognised(sd3_pipe(prompt=[digit_prompt(d) for d in range(10)], **kwargs).images)
    with_cfg, without_cfg = counts[None], counts[1.0]
    print(f"recognised: {with_cfg}/40 with CFG, {without_cfg}/40 without")
    assert with_cfg >= SD3_MIN_CORRECT_CFG
    assert with_cfg - without_cfg >= SD3_MIN_CFG_GAIN


def test_sd3_plain_diffusers_defaults_give_prompted_digits():
    """A user's first call: every argument at the pipeline's defaults (32x32, CFG with guidance_scale 7 and the
    negative prompt "", T5 padded to 256 tokens, no attention mask) but the step count. 40/40 at 28 steps over seeds
    0-3 (31/40 with guidance_scale 1): the model was trained with T5 padding-length augmentation."""
    import diffusers

    torch.set_num_threads(1)
    pipe = diffusers.DiffusionPipeline.from_pretrained(REFERENCE_SD3_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = pipe([digit_prompt(d) for d in range(10)], num_inference_steps=DEFAULTS_STEPS,
                      generator=torch.Generator("cpu").manual_seed(0)).images  # PIL images, as a user gets them
    assert images[0].size == (32, 32)
    pixels = torch.tensor(np.stack([np.asarray(image) for image in images]), dtype=torch.float32) / 255.0
    assert _recognised(pixels.permute(0, 3, 1, 2)) >= MIN_CORRECT_DEFAULTS


def test_sd3_first_block_residual_changes_slowly(sd3_pipe, sd3_generated):
    """Well below a random transformer of the same config, on the same call (the cond half of the CFG batch)."""
    _, residuals = sd3_generated
    assert len(residuals) == SD3_STEPS and residuals[0].shape[0] == 20  # one call per step, batch [uncond, cond]
    trained, diffs = _median_rel_l1_change([r[10:] for r in residuals])
    random_pipe = reference_pipeline(family="sd3")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        random_pipe.transformer = type(random_pipe.transformer).from_config(random_pipe.transformer.config).eval()
    _, random_residuals = _first_block_residuals(
        random_pipe, reference_call_kwargs(SD3_STEPS, seed=0, family="sd3"), [digit_prompt(d) for d in range(10)]
    )
    random, _ = _median_rel_l1_change([r[10:] for r in random_residuals])
    print(f"first-block residual rel. L1 change per step: median {trained:.3f} (random weights {random:.3f}); "
          + " ".join(f"{d:.3f}" for d in diffs))
    assert trained < 0.5 * random, (trained, random)


def test_sd3_never_skipping_cache_is_bitwise_the_plain_pipeline(sd3_pipe):
    import cachedit

    prompts = [digit_prompt(3), digit_prompt(8)]
    with torch.no_grad():
        expected = sd3_pipe(prompt=prompts, **reference_call_kwargs(6, seed=1, family="sd3")).images
    pipe = reference_pipeline(family="sd3")
    cachedit.accelerate(pipe, device="cpu_ref", cache=dict(Fn=1, Bn=0, residual_diff_threshold=0, warmup_steps=0))
    try:
        got = pipe(prompt=prompts, **reference_call_kwargs(6, seed=1, family="sd3")).images
        assert cachedit.summary(pipe)["cache"]["transformer"]["computed_fraction"] == 1.0
    finally:
        cachedit.disable(pipe)
    assert torch.equal(got, expected)


def test_reference_family_is_checked():
    with pytest.raises(ValueError, match="family"):
        reference_pipeline(family="qwenimage")
    with pytest.raises(ValueError, match="family"):
        reference_call_kwargs(family="sd35")


@pytest.mark.parametrize("command", ["generate", "benchmark", "tune"])
def test_reference_sd3_is_a_model_choice_of_the_cli(command):
    import argparse
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(f"cachedit.{command}").add_arguments(parser)
    extra = ["--speedup", "3"] if command == "tune" else []
    assert parser.parse_args(["--model", "reference-sd3", *extra]).model == "reference-sd3"


def test_reference_sd3_bench_calls_with_and_without_cfg():
    from cachedit.benchmarking import model_and_call

    _, call, prompts = model_and_call("reference-sd3")
    assert prompts == [digit_prompt(d) for d in range(10)]
    assert call(4, 0)["guidance_scale"] > 1.0  # SD3's CFG: one call on [uncond, cond]
    assert model_and_call("reference-sd3", cfg=False)[1](4, 0)["guidance_scale"] == 1.0
