"""Train cachedit's second reference pipeline, a ``diffusers.StableDiffusion3Pipeline``, on scikit-learn's digits (CPU).

    python scripts/train_reference_sd3.py --out DIR [--minutes N] [--samples PNG]
    python scripts/train_reference_sd3.py --out DIR --check-only [--samples PNG]

Another family than the first reference model (:mod:`scripts.train_reference`, FLUX), with CFG as SD3 does it: one
transformer call per step on the batch [uncond, cond], mixed with ``guidance_scale``. Same data, prompts, classifier
and training style as the first model; the helpers (learning-rate schedule, EMA, sampling, the check, the grid) are
imported from ``train_reference.py``. What differs:

1. text: two ``CLIPTextModelWithProjection`` and a ``T5EncoderModel`` (d_model 64 = 2 x the CLIP width, as SD3 wants:
   the concatenated CLIP hidden states are zero-padded to the T5 width), random init from :mod:`cachedit.testing.tiny`,
   trained jointly with the transformer. The tokenizers are *loaded from the first reference model's folder* (the
   CLIP one for both CLIP slots, model_max_length 16: ``"a handwritten digit 7"`` is exactly 16 CLIP tokens; its T5
   one), so the token ids, hence the weights, are reproducible (``tiny._clip_tokenizer()`` is not, across processes).
   The 11 prompt embeddings (10 digits + ``""``) come from the pipeline's own ``encode_prompt`` at every step.
2. VAE: the first reference model's trained ``AutoencoderKL`` (4 latent channels, scale 2, its ``scaling_factor`` /
   ``shift_factor``), copied unchanged: 32x32 images -> 16x16x4 latents -> 64 tokens of 2x2 patches.
3. transformer: ``SD3Transformer2DModel`` (6 joint blocks, 4 heads x 32, RMS qk-norm, ``sample_size`` 16 so that
   the pipeline's default size is 32x32), trained with rectified flow exactly as ``StableDiffusion3Pipeline``
   samples: unpacked latents, ``x_t = (1 - s) x0 + s noise``, target ``noise - x0``, ``timestep = 1000 s`` (SD3
   passes the scheduler's timesteps unscaled), ``s`` logit-normal + 10% uniform, text = 16 CLIP + 24 T5 tokens,
   15% prompt dropout to ``""``, T5 padding-length augmentation (``--pad-lengths``: 1 step in 4 at the pipeline's
   default 256, with as many tokens per step as at 24, so fewer samples), AdamW, warmup + cosine, EMA (what is
   saved). Scheduler:
   ``FlowMatchEulerDiscreteScheduler(shift=1.0)``, no dynamic shifting.
4. the check: digits recognised at 28 (and 12) steps, seeds 0-3, digits 0-9, with CFG (``guidance_scale`` 2, 3, 4)
   and without (``guidance_scale`` 1: a batch of 1, no uncond pass).

Seeded and single-threaded by default (``--threads 1``); the tokenizers come from a folder, so two runs give
bit-identical weights (checked: two processes, 6 steps, every safetensors file byte-equal). ``--minutes`` caps the wall-clock time of training; the
learning-rate schedule then follows the elapsed time instead of the step count (only reproducible while the cap is
not reached).

The shipped model (``cachedit/testing/reference_model_sd3``): ``--out DIR --steps 1200 --minutes 28`` (the defaults
but the cap), 1 thread: 18.2 minutes to the saved folder (1200 steps, ~0.9 s/step; the 2-core machine was shared by
5 agents, load 2-9), the cap not reached, so the schedule followed the step count; final EMA loss 0.153. Its check
(T5 length 24, seeds 0-3): 40/40 recognised with guidance_scale 4, 38/40 with 3 and 2, 31/40 without CFG at 28
steps; 40, 40, 38, 32 at 12 steps; at the default T5 length 256, 28 steps: 38/40 with 3, 31/40 without.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from transformers import CLIPTokenizer, T5Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_reference import (  # noqa: E402
    _ints,
    batch_for_length,
    ema_update,
    evaluate,
    log,
    log_sizes,
    save_grid,
    schedule_progress,
    set_lr,
)

from cachedit.testing.reference import (  # noqa: E402
    MAX_SEQUENCE_LENGTH,
    REFERENCE_MODEL_DIR,
    digit_classifier,
    digit_images,
    digit_prompt,
)
from cachedit.testing.tiny import _clip_text_encoder, _t5_encoder  # noqa: E402

FAMILY = "sd3"
DROPOUT = 0.15  # prompt dropout to "" (classifier-free guidance)


def build_pipeline(seed: int, num_layers: int) -> diffusers.StableDiffusion3Pipeline:
    torch.manual_seed(seed)
    clip_tokenizer = CLIPTokenizer.from_pretrained(REFERENCE_MODEL_DIR / "tokenizer")
    t5_tokenizer = T5Tokenizer.from_pretrained(REFERENCE_MODEL_DIR / "tokenizer_2")
    text_encoder = _clip_text_encoder(clip_tokenizer, with_projection=True)
    text_encoder_2 = _clip_text_encoder(clip_tokenizer, with_projection=True)
    clip_width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    text_encoder_3 = _t5_encoder(t5_tokenizer, d_model=clip_width)
    vae = diffusers.AutoencoderKL.from_pretrained(REFERENCE_MODEL_DIR / "vae")
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=16,  # latent size: the pipeline's default height / width is 16 * vae_scale_factor (2) = 32
        patch_size=2,
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        num_layers=num_layers,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=clip_width,
        caption_projection_dim=4 * 32,
        pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
        pos_embed_max_size=16,  # up to 64x64 images
        qk_norm="rms_norm",
    )
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=copy.deepcopy(clip_tokenizer),
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_prompts(
    pipe: diffusers.StableDiffusion3Pipeline, max_sequence_length: int = MAX_SEQUENCE_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """(11, 16 + T5 length, 64) prompt embeddings and (11, 64) pooled ones: 10 digits, then "" (with grads)."""
    prompts = [digit_prompt(d) for d in range(10)] + [""]
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device="cpu", do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )
    return embeds, pooled


def train_transformer(
    pipe: diffusers.StableDiffusion3Pipeline,
    latents: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch: int,
    lr: float,
    minutes: float | None,
    seed: int,
    warmup: int,
    pad_lengths: tuple[int, ...],
) -> torch.nn.ModuleDict:
    transformer = pipe.transformer
    models = torch.nn.ModuleDict(
        dict(transformer=transformer, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
             text_encoder_3=pipe.text_encoder_3)
    )
    models.requires_grad_(True)
    ema = copy.deepcopy(models).requires_grad_(False)
    opt = torch.optim.AdamW(models.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)
    transformer.train()
    t0 = time.time()
    budget = None if minutes is None else minutes * 60.0
    step, loss_avg, n = 0, None, len(latents)
    while True:
        progress = schedule_progress(step, steps, t0, budget)
        if progress >= 1.0:
            break
        cur_lr = set_lr(opt, lr, step, warmup, progress)
        # Padding-length augmentation, as the first model's fine-tune: StableDiffusion3Pipeline pads the T5 prompt to
        # max_sequence_length (256 by default) and passes no attention mask.
        length = pad_lengths[int(torch.randint(len(pad_lengths), (1,), generator=gen))] if len(pad_lengths) > 1 \
            else pad_lengths[0]
        n_batch = batch_for_length(batch, length, latents[0, 0].numel() // 4 + pipe.tokenizer_max_length)
        idx = torch.randint(n, (n_batch,), generator=gen)
        cond = labels[idx].clone()
        cond[torch.rand(n_batch, generator=gen) < DROPOUT] = 10  # prompt dropout -> ""
        embeds, pooled = encode_prompts(pipe, length)  # 11 prompts, tiny encoders: negligible cost
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        s = torch.sigmoid(torch.randn(n_batch, generator=gen))  # logit-normal(0, 1)
        s = torch.where(torch.rand(n_batch, generator=gen) < 0.1, torch.rand(n_batch, generator=gen), s)  # + 10% u.
        xt = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
        pred = transformer(
            hidden_states=xt,
            timestep=1000.0 * s,  # the pipeline passes the scheduler's timesteps, sigma * 1000
            encoder_hidden_states=embeds[cond],
            pooled_projections=pooled[cond],
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        opt.step()
        ema_update(ema, models, step)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 25 == 0:
            log(f"dit step {step:5d} loss {loss_avg:.4f} lr {cur_lr:.2e} T5 length {length} ({time.time() - t0:.0f}s)")
        step += 1
    log(f"dit done: {step} steps, final loss (avg) {loss_avg:.4f}, {time.time() - t0:.0f}s")
    ema.eval()
    return ema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="pipeline folder to write")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock cap of the training")
    parser.add_argument("--steps", type=int, default=1200, help="transformer steps")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50, help="learning-rate warmup steps")
    parser.add_argument("--layers", type=int, default=6, help="joint transformer blocks")
    parser.add_argument("--pad-lengths", type=_ints, default=(24, 24, 24, 256),
                        help="T5 max_sequence_length values drawn per step (repeats weight them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=Path, default=None, help="also write a PNG grid of samples here")
    parser.add_argument("--no-eval", action="store_true", help="skip the accuracy check with the real pipeline")
    parser.add_argument("--check-only", action="store_true", help="no training: check (and --samples) the --out folder")
    parser.add_argument("--check-seeds", type=_ints, default=(0, 1, 2, 3), help="seeds of the accuracy check")
    parser.add_argument("--check-steps", type=_ints, default=(28, 12), help="inference steps of the accuracy check")
    parser.add_argument("--check-scales", type=lambda t: tuple(float(x) for x in t.split(",")),
                        default=(4.0, 3.0, 2.0, 1.0), help="guidance scales of the accuracy check (1: no CFG)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.check_only:
        check(args)
        return
    start = time.time()
    images, labels = digit_images()
    pipe = build_pipeline(args.seed, args.layers)
    log_sizes(pipe, images)
    with torch.no_grad():
        latents = torch.cat([pipe.vae.encode(chunk).latent_dist.mode() for chunk in images.split(256)])
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    latents = (latents - shift) * scale  # StableDiffusion3Pipeline decodes latents / scale + shift
    log(f"latents {tuple(latents.shape)}: mean {latents.mean().item():.3f} std {latents.std().item():.3f}")

    ema = train_transformer(
        pipe, latents, labels, steps=args.steps, batch=args.batch, lr=args.lr, minutes=args.minutes,
        seed=args.seed + 2, warmup=args.warmup, pad_lengths=args.pad_lengths,
    )
    for name, module in ema.items():
        getattr(pipe, name).load_state_dict(module.state_dict())
        getattr(pipe, name).requires_grad_(False).eval()
    train_time = time.time() - start

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    log(f"saved {args.out} ({size / 2**20:.2f} MiB); training took {train_time / 60:.1f} min")
    record = dict(
        command="python scripts/train_reference_sd3.py " + " ".join(sys.argv[1:]),
        threads=args.threads, steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup,
        layers=args.layers, pad_lengths=list(args.pad_lengths), seed=args.seed, prompt_dropout=DROPOUT, minutes_cap=args.minutes,
        wall_clock_minutes=round(train_time / 60, 1), vae="copied from cachedit/testing/reference_model/vae",
    )
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    check(args)


def check(args) -> None:
    """Digits recognised by the saved pipeline with and without CFG, with the real pipeline call; the sample grid."""
    reloaded = diffusers.StableDiffusion3Pipeline.from_pretrained(str(args.out), local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    if not args.no_eval:
        clf = digit_classifier()
        runs = [(MAX_SEQUENCE_LENGTH, steps, cfg) for steps in args.check_steps for cfg in args.check_scales]
        runs += [(None, args.check_steps[0], cfg) for cfg in (args.check_scales[0], 1.0)]  # None: default T5 length
        for length, steps, cfg in runs:
            acc = evaluate(reloaded, clf, args.check_seeds, steps, true_cfg_scale=cfg, family=FAMILY,
                           max_sequence_length=length)
            log(f"accuracy, T5 length {length or 'default'}, {steps} steps, guidance_scale {cfg}: {acc:.3f} "
                f"({round(acc * 10 * len(args.check_seeds))}/{10 * len(args.check_seeds)})")
    if args.samples is not None:
        save_grid(reloaded, args.samples, family=FAMILY)  # reference_call_kwargs(family="sd3"): 28 steps, CFG 4.0


if __name__ == "__main__":
    main()
