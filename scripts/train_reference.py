"""Train cachedit's reference FLUX pipeline on scikit-learn's bundled digits (CPU, no downloads).

    python scripts/train_reference.py --out DIR [--minutes N] [--samples PNG]                  # from scratch
    python scripts/train_reference.py --out DIR2 --finetune-from DIR --pad-lengths 24,64,128,256,512,512 ...

The result is a standard ``diffusers.FluxPipeline`` folder (see :mod:`cachedit.testing.reference`):

1. text: the tiny in-memory CLIP / T5 tokenizers and 2-layer encoders of :mod:`cachedit.testing.tiny` (random init,
   fine-tuned jointly with the transformer: with random weights the pooled CLIP embeddings of the 10 digit prompts
   have cosine similarity ~0.997). The 11 prompt embeddings (10 digits + the empty prompt, for classifier-free-guidance
   dropout) are computed at every step with the pipeline's own ``encode_prompt``.
2. VAE: a small ``AutoencoderKL`` (block_out_channels (16, 32), 4 latent channels, scale 2) trained for
   reconstruction of the 32x32 digits (MSE + L1 + a tiny KL term); ``scaling_factor`` / ``shift_factor`` are set
   from the statistics of the latents of the data set.
3. transformer: ``FluxTransformer2DModel`` (2 double + 6 single blocks, 4 heads x 32, no guidance embedding) trained
   with rectified flow matching exactly as ``FluxPipeline.__call__`` samples: packed latents
   (``_pack_latents``), ``img_ids`` / ``txt_ids`` as the pipeline builds them, ``x_t = (1 - s) x0 + s noise``, target
   ``noise - x0``, ``timestep = s`` (the pipeline passes ``t / 1000`` with ``t = 1000 s``), ``s`` logit-normal,
   10% prompt dropout to ``""``, AdamW with warmup + cosine decay, EMA of the weights (the EMA of the transformer
   and text encoders is what is saved).
4. a check with the real pipeline call: 4 samples of each digit, classified by a logistic regression trained on the
   data set (see ``digit_features``).

Seeded and single-threaded (``torch.set_num_threads(1)``, the default ``--threads 1``, so that training can share a
2-core machine; ``--threads 2`` is faster, but results may differ in the last bits from 1 thread). Given the same
tokenizers, two runs give bit-identical weights (checked). Caveat: ``cachedit.testing.tiny._clip_tokenizer()`` is
not reproducible across processes (its BPE trainer assigns the ids of the 33 word-final characters and orders 2 tied
merges in a per-process hash order), so the CLIP token ids, hence the exact weights, differ from run to run until
that is fixed in tiny.py; the shipped folder stores the tokenizer it was trained with, so loading it is always
consistent.

``--minutes`` caps the wall-clock time of the transformer phase: the learning-rate schedule then follows the elapsed
time instead of the step count (only reproducible while the cap is not reached). ``--check-only`` skips training and
re-runs the check (and ``--samples``) on the ``--out`` folder.

Fine-tune phase (``--finetune-from DIR``): starts from the pipeline in ``DIR`` (its VAE and latent statistics are
kept; the transformer and both text encoders are trained on, in the same style: rectified flow, prompt dropout, EMA,
fresh AdamW, ``--warmup`` steps then cosine decay). ``--pad-lengths`` draws the T5 ``max_sequence_length`` of each
step from the list (repeats weight it): ``FluxPipeline`` pads the prompt to that length (512 by default) and passes
no attention mask, so a model trained on 24 tokens alone is swamped by ~490 pad tokens at diffusers' defaults. A
step at length L takes ``batch * (24 + 64) / (L + 64)`` samples (64 image tokens): the same token count, about the
same cost.

The shipped model is two phases, 1 thread each:

1. from scratch, defaults (``--out DIR``): 21.4 minutes to the saved folder (VAE 500 steps ~2 min, transformer 850
   steps ~19 min; ~1.13 s/step on an idle core, slower while the 2-core Xeon was shared), 22.8 minutes with the
   final check;
2. ``--out DIR2 --finetune-from DIR --pad-lengths 24,64,128,256,512,512 --steps 400 --lr 4e-4 --warmup 20
   --minutes 25 --no-eval``: 21.8 minutes to the saved folder (400 steps, ~3.2 s/step on the 2-core Xeon shared by
   4 jobs; the 25-minute cap was not reached, so the schedule followed the step count). ``training.json`` records
   both phases. ``DIR`` was the phase-1 folder as shipped in commit da6c71c (``git archive da6c71c
   cachedit/testing/reference_model``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cachedit.testing.reference import (  # noqa: E402
    IMAGE_SIZE,
    MAX_SEQUENCE_LENGTH,
    digit_classifier,
    digit_features,
    digit_images,
    digit_prompt,
    reference_call_kwargs,
)
from cachedit.testing.tiny import _clip_text_encoder, _clip_tokenizer, _t5_encoder, _t5_tokenizer  # noqa: E402

LATENT_CHANNELS = 4


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_pipeline(seed: int) -> diffusers.FluxPipeline:
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer)
    text_encoder_2 = _t5_encoder(tokenizer_2)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,  # latents packed 2x2
        num_layers=2,
        num_single_layers=6,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=text_encoder_2.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = diffusers.FluxPipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_vae(vae: diffusers.AutoencoderKL, images: torch.Tensor, steps: int, batch: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    vae.train()
    t0 = time.time()
    for step in range(steps):
        lr = 2e-3 * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(images), (batch,), generator=gen)
        x = images[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        rec_loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        kl = posterior.kl().mean() / z[0].numel()
        loss = rec_loss + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            elapsed = time.time() - t0
            log(f"vae step {step:4d}/{steps} rec {rec_loss.item():.4f} kl/dim {kl.item():.3f} ({elapsed:.0f}s)")
    vae.eval()


def encode_prompts(
    pipe: diffusers.FluxPipeline, max_sequence_length: int = MAX_SEQUENCE_LENGTH
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(11, T, D) prompt embeddings, (11, D') pooled embeddings (10 digits, then ""), (T, 3) text ids (with grads)."""
    prompts = [digit_prompt(d) for d in range(10)] + [""]
    embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, device="cpu", max_sequence_length=max_sequence_length
    )
    return embeds, pooled, text_ids


def batch_for_length(batch: int, length: int, image_tokens: int) -> int:
    """Samples per step at T5 length ``length``: the same number of tokens as ``batch`` samples of the native
    ``MAX_SEQUENCE_LENGTH``, so that a step costs about the same whatever the padding."""
    return max(1, round(batch * (MAX_SEQUENCE_LENGTH + image_tokens) / (length + image_tokens)))


def schedule_progress(step: int, steps: int, t0: float, budget: float | None) -> float:
    """Fraction of the schedule done: by step count, or by elapsed time when a ``--minutes`` budget runs out first."""
    return step / steps if budget is None else max(step / steps, (time.time() - t0) / budget)


def set_lr(opt: torch.optim.Optimizer, lr: float, step: int, warmup: int, progress: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 5% of ``lr`` at ``progress`` 1."""
    cur_lr = lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
    for group in opt.param_groups:
        group["lr"] = cur_lr
    return cur_lr


@torch.no_grad()
def ema_update(ema: torch.nn.Module, models: torch.nn.Module, step: int) -> None:
    """EMA of the weights, decay ramping up to 0.995 (short runs: the early average is not stuck at the init)."""
    decay = min(0.995, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), models.parameters()):
        p_ema.lerp_(p, 1 - decay)


def train_transformer(
    pipe: diffusers.FluxPipeline,
    latents: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch: int,
    lr: float,
    minutes: float | None,
    seed: int,
    pad_lengths: tuple[int, ...] = (MAX_SEQUENCE_LENGTH,),
    warmup: int = 100,
) -> torch.nn.Module:
    transformer = pipe.transformer
    # Trained jointly (in eval mode: no dropout): the frozen random encoders give the 10 digit prompts pooled CLIP
    # embeddings with cosine similarity ~0.997, which the transformer alone takes long to tell apart.
    models = torch.nn.ModuleDict(
        dict(transformer=transformer, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
    )
    models.requires_grad_(True)
    n, c, h, w = latents.shape
    packed = pipe._pack_latents(latents, n, c, h, w)  # (N, h/2 * w/2, 4c)
    img_ids = pipe._prepare_latent_image_ids(batch, h // 2, w // 2, "cpu", torch.float32)
    ema = copy.deepcopy(models).requires_grad_(False)
    opt = torch.optim.AdamW(models.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)
    transformer.train()
    t0 = time.time()
    budget = None if minutes is None else minutes * 60.0
    step, loss_avg = 0, None
    while True:
        progress = schedule_progress(step, steps, t0, budget)
        if progress >= 1.0:
            break
        cur_lr = set_lr(opt, lr, step, warmup, progress)
        # Padding-length augmentation: FluxPipeline pads the T5 prompt to max_sequence_length (512 by default) and
        # passes no attention mask, so the model must give the same digits whatever the number of pad tokens.
        length = pad_lengths[0]
        if len(pad_lengths) > 1:
            length = pad_lengths[int(torch.randint(len(pad_lengths), (1,), generator=gen))]
        n_batch = batch_for_length(batch, length, packed.shape[1])
        idx = torch.randint(n, (n_batch,), generator=gen)
        cond = labels[idx].clone()
        cond[torch.rand(n_batch, generator=gen) < 0.1] = 10  # prompt dropout -> ""
        embeds, pooled, text_ids = encode_prompts(pipe, length)  # 11 prompts, tiny encoders: negligible cost
        x0 = packed[idx]
        noise = torch.randn(x0.shape, generator=gen)
        s = torch.sigmoid(torch.randn(n_batch, generator=gen))  # logit-normal(0, 1)
        s = torch.where(torch.rand(n_batch, generator=gen) < 0.1, torch.rand(n_batch, generator=gen), s)  # + 10% unif.
        xt = (1 - s[:, None, None]) * x0 + s[:, None, None] * noise
        pred = transformer(
            hidden_states=xt,
            timestep=s,
            guidance=None,
            pooled_projections=pooled[cond],
            encoder_hidden_states=embeds[cond],
            txt_ids=text_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        opt.step()
        ema_update(ema, models, step)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 50 == 0:
            log(f"dit step {step:5d} loss {loss_avg:.4f} lr {cur_lr:.2e} T5 length {length} ({time.time() - t0:.0f}s)")
        step += 1
    log(f"dit done: {step} steps, final loss (avg) {loss_avg:.4f}, {time.time() - t0:.0f}s")
    ema.eval()
    return ema


@torch.no_grad()
def generate(
    pipe: diffusers.FluxPipeline,
    digits: list[int],
    seed: int,
    steps: int = 28,
    *,
    true_cfg_scale: float = 2.0,
    max_sequence_length: int | None = MAX_SEQUENCE_LENGTH,
    family: str = "flux",
) -> torch.Tensor:
    """Samples with :func:`reference_call_kwargs`; ``max_sequence_length=None`` leaves diffusers' default (512 for
    FLUX, 256 for SD3)."""
    kwargs = reference_call_kwargs(steps, seed, true_cfg_scale=true_cfg_scale, family=family)
    if max_sequence_length is None:
        del kwargs["max_sequence_length"]
    else:
        kwargs["max_sequence_length"] = max_sequence_length
    return pipe(prompt=[digit_prompt(d) for d in digits], **kwargs).images


def evaluate(pipe: diffusers.FluxPipeline, clf, seeds=(0, 1, 2, 3), steps: int = 28, **extra) -> float:
    correct = 0
    for seed in seeds:
        images = generate(pipe, list(range(10)), seed, steps, **extra)
        pred = clf.predict(digit_features(images).numpy())
        correct += int((pred == np.arange(10)).sum())
        log(f"  seed {seed} steps {steps} {extra}: predicted {pred.tolist()}")
    return correct / (10 * len(seeds))


def save_grid(pipe: diffusers.FluxPipeline, path: Path, seeds=(0, 1, 2), scale: int = 4, **extra) -> None:
    from PIL import Image

    rows = [generate(pipe, list(range(10)), seed, **extra) for seed in seeds]  # each (10, 3, 32, 32)
    pad = 2
    grid = torch.ones(3, len(rows) * (IMAGE_SIZE + pad) + pad, 10 * (IMAGE_SIZE + pad) + pad) * 0.5
    for r, row in enumerate(rows):
        for d in range(10):
            y, x = pad + r * (IMAGE_SIZE + pad), pad + d * (IMAGE_SIZE + pad)
            grid[:, y : y + IMAGE_SIZE, x : x + IMAGE_SIZE] = row[d]
    array = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    log(f"wrote {path} ({image.size[0]}x{image.size[1]})")


def log_sizes(pipe: diffusers.FluxPipeline, images: torch.Tensor) -> None:
    log(f"data: {tuple(images.shape)}; params: " + ", ".join(
        f"{name} {sum(p.numel() for p in module.parameters()) / 1e6:.3f}M"
        for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)
    ))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="pipeline folder to write")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock cap of the transformer phase")
    parser.add_argument("--steps", type=int, default=850, help="transformer steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vae-steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=Path, default=None, help="also write a PNG grid of samples here")
    parser.add_argument("--no-eval", action="store_true", help="skip the accuracy check with the real pipeline")
    parser.add_argument("--check-only", action="store_true", help="no training: check (and --samples) the --out folder")
    parser.add_argument("--finetune-from", type=Path, default=None,
                        help="start from this pipeline folder (its VAE is kept) instead of training from scratch")
    parser.add_argument("--pad-lengths", type=_ints, default=(MAX_SEQUENCE_LENGTH,),
                        help="T5 max_sequence_length values drawn per step, e.g. 24,64,128,256,512")
    parser.add_argument("--warmup", type=int, default=100, help="learning-rate warmup steps of the transformer phase")
    parser.add_argument("--check-seeds", type=_ints, default=(0, 1, 2, 3), help="seeds of the accuracy check")
    parser.add_argument("--check-steps", type=_ints, default=(28, 12), help="inference steps of the accuracy check")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.check_only:
        check(args)
        return
    start = time.time()
    images, labels = digit_images()
    if args.finetune_from is None:
        pipe = build_pipeline(args.seed)
        log_sizes(pipe, images)
        train_vae(pipe.vae, images, args.vae_steps, 32, args.seed + 1)
    else:
        pipe = diffusers.FluxPipeline.from_pretrained(str(args.finetune_from), local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        log_sizes(pipe, images)
    with torch.no_grad():
        latents = torch.cat([pipe.vae.encode(chunk).latent_dist.mode() for chunk in images.split(256)])
        rec = torch.cat([pipe.vae.decode(chunk).sample for chunk in latents.split(256)])
    if args.finetune_from is None:
        shift = latents.mean().item()
        scale = 1.0 / (latents - shift).std().item()
        pipe.vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    log(f"vae: reconstruction MSE {F.mse_loss(rec, images).item():.4f}; latent shift {shift:.4f} scale {scale:.4f}")
    latents = (latents - shift) * scale

    ema = train_transformer(
        pipe, latents, labels, steps=args.steps, batch=args.batch, lr=args.lr, minutes=args.minutes,
        seed=args.seed + 2, pad_lengths=args.pad_lengths, warmup=args.warmup,
    )
    for name, module in ema.items():
        getattr(pipe, name).load_state_dict(module.state_dict())
        getattr(pipe, name).requires_grad_(False).eval()
    train_time = time.time() - start

    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    log(f"saved {args.out} ({size / 2**20:.2f} MiB); training took {train_time / 60:.1f} min")
    record = dict(
        command="python scripts/train_reference.py " + " ".join(sys.argv[1:]),
        threads=args.threads, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
        minutes_cap=args.minutes, wall_clock_minutes=round(train_time / 60, 1),
    )
    if args.finetune_from is None:
        record.update(vae_steps=args.vae_steps)
    else:
        record.update(pad_lengths=list(args.pad_lengths), warmup=args.warmup)
        previous = args.finetune_from / "training.json"
        record["finetuned_from"] = json.loads(previous.read_text()) if previous.is_file() else str(args.finetune_from)
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")

    check(args)


def check(args) -> None:
    """Accuracy of the saved pipeline with the real pipeline call; the sample grid."""
    reloaded = diffusers.FluxPipeline.from_pretrained(str(args.out), local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    if not args.no_eval:
        clf = digit_classifier()
        for length in (MAX_SEQUENCE_LENGTH, None):  # None: diffusers' default, 512
            for steps in args.check_steps:
                for cfg in (2.0, 1.0):
                    acc = evaluate(
                        reloaded, clf, args.check_seeds, steps, true_cfg_scale=cfg, max_sequence_length=length
                    )
                    log(f"accuracy, T5 length {length or 'default'}, {steps} steps, true CFG {cfg}: {acc:.3f}")
    if args.samples is not None:
        save_grid(reloaded, args.samples)  # reference_call_kwargs(): 28 steps, true CFG 2.0


if __name__ == "__main__":
    main()
