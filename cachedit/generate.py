"""`cachedit generate`: one image from a pipeline folder or the built-in reference model, accelerated
as the flags say, saved with a JSON record of what ran. Works under torchrun for parallel plans.

    cachedit generate --prompt "a handwritten digit 7" --cache fast
    torchrun --nproc-per-node 2 -m cachedit generate --parallel ulysses --degree 2
    torchrun --nproc-per-node 4 -m cachedit generate --parallel ulysses --tensor 2 --parallel-vae
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from .arguments import UserError, finite_float, model_source, positive_int, writable_dir
from .cache.calibrators import CALIBRATORS

PARALLEL_MODES = ("none", "ulysses", "ring", "usp", "tp", "cfg")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="reference", type=model_source(*REFERENCE_MODELS),
                   help="a diffusers pipeline folder, or 'reference' / 'reference-sd3' (built in)")
    p.add_argument("--prompt", default="a handwritten digit 7")
    p.add_argument("--steps", type=positive_int, default=28)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="backend name or 'auto'")
    p.add_argument("--cache", default=None, help="a preset (fbcache, fast, balanced, quality), 'none', or a "
                   "YAML / JSON file of cache fields (e.g. a tuned config)")
    p.add_argument("--config", default=None, help="a YAML / JSON file of accelerate's arguments (device, cache, "
                   "parallel, quantize, compile, attention, inference_mode); flags given here win")
    p.add_argument("--Fn", type=int, help="explicit DBCache: first blocks always computed")
    p.add_argument("--Bn", type=int, help="explicit DBCache: last blocks always computed")
    p.add_argument("--threshold", type=finite_float, help="explicit DBCache: residual diff threshold")
    p.add_argument("--warmup", type=int, help="explicit DBCache: warmup steps")
    p.add_argument("--calibrator", choices=sorted(CALIBRATORS.names()), help="forecast skipped residuals")
    p.add_argument("--parallel", choices=PARALLEL_MODES, default="none")
    p.add_argument("--degree", type=positive_int, default=None, help="ranks for the parallel mode (default: "
                   "WORLD_SIZE)")
    p.add_argument("--ulysses", type=positive_int, default=None, help="usp: the Ulysses degree (the rest is Ring)")
    p.add_argument("--tensor", type=positive_int, default=None, help="ulysses / ring / usp: also split weights this many "
                   "ways (hybrid mesh; --degree counts the context-parallel ranks only)")
    p.add_argument("--parallel-text-encoder", action="store_true", help="shard the text encoders over every rank")
    p.add_argument("--parallel-vae", action="store_true", help="split the VAE decode over every rank")
    p.add_argument("--attention", default=None, help="attention kernel name, or 'auto'")
    p.add_argument("--no-inference-mode", dest="inference_mode", action="store_false", default=None,
                   help="run the call under torch.no_grad only, not torch.inference_mode")
    p.add_argument("--quantize", choices=["fp8", "int8", "int8-weight-only"], default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", default="out/generate", type=writable_dir, help="folder for the PNG and the JSON record")


def cache_config(args) -> dict | str | None:
    explicit = {k: v for k, v in dict(Fn=args.Fn, Bn=args.Bn, residual_diff_threshold=args.threshold,
                                      warmup_steps=args.warmup, calibrator=args.calibrator).items() if v is not None}
    if args.cache in (None, "none"):
        return explicit or None
    if explicit:
        from .config import CacheConfig

        return CacheConfig.preset(args.cache, **explicit)
    return args.cache


def parallel_config(args, world: int) -> dict | None:
    if args.parallel == "none":
        return None
    components = {k: True for k, on in (("text_encoder", args.parallel_text_encoder), ("vae", args.parallel_vae)) if on}
    tensor = args.tensor or 1
    if tensor > 1 and args.parallel not in ("ulysses", "ring", "usp"):
        raise UserError(f"--tensor={tensor} combines with --parallel ulysses / ring / usp (use --parallel tp alone)")
    degree = args.degree or world // tensor
    if args.parallel == "ulysses":
        return {"ulysses": degree, "tensor": tensor, **components}
    if args.parallel == "ring":
        return {"ring": degree, "tensor": tensor, **components}
    if args.parallel == "tp":
        return {"tensor": degree, **components}
    if args.parallel == "cfg":
        return {"cfg": degree, **components}
    ulysses = args.ulysses or 2
    if degree % ulysses:
        raise UserError(f"--ulysses={ulysses} must divide --degree={degree} for usp")
    return {"ulysses": ulysses, "ring": degree // ulysses, "tensor": tensor, **components}


def check_world_size(parallel: dict | None, mode: str, world: int) -> None:
    """The processes torchrun started must be exactly the plan's: a plan of one process would
    silently run unsplit, one of fewer than started would leave ranks idle."""
    if parallel is None:
        if world > 1:
            raise UserError(f"WORLD_SIZE={world} processes but --parallel none: every rank would compute the same "
                            "image; pick a --parallel mode, or run one process")
        return
    from .config import ParallelConfig

    size = ParallelConfig(**parallel).world_size
    if size == 1:
        raise UserError(f"--parallel {mode} splits nothing over WORLD_SIZE={world} process(es); run it under "
                        "torchrun --nproc-per-node N (N >= 2), or drop --parallel")
    if size != world:
        raise UserError(f"--parallel {mode} with degrees {parallel} needs {size} processes, but WORLD_SIZE={world}; "
                        f"run it under torchrun --nproc-per-node {size}")


def quant_config(name: str | None) -> dict | None:
    if name is None:
        return None
    return {"scheme": "int8", "weight_only": True} if name == "int8-weight-only" else {"scheme": name}


# The built-in trained reference models: name -> family (cachedit.testing.reference).
REFERENCE_MODELS = {"reference": "flux", "reference-sd3": "sd3"}


def load_pipeline(model: str):
    if model in REFERENCE_MODELS:
        from .testing.reference import reference_pipeline

        return reference_pipeline(family=REFERENCE_MODELS[model])
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model)


def call_kwargs(model: str, steps: int, seed: int) -> dict:
    if model in REFERENCE_MODELS:
        from .testing.reference import reference_call_kwargs

        return reference_call_kwargs(num_inference_steps=steps, seed=seed, family=REFERENCE_MODELS[model])
    return {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(seed), "output_type": "pt"}


def run(args) -> int:
    import cachedit
    from .config import CacheConfig, ParallelConfig, QuantConfig, coerce
    from .plugins import manager

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:  # everything the flags decide is checked before the model loads
        from . import config_file

        found = config_file.load(args.config) if args.config else {}
        backend = manager().resolve(config_file.merge(found, device=args.device)["device"] or "auto")
        cache, parallel, quantize = cache_config(args), parallel_config(args, world), quant_config(args.quantize)
        if config_file.is_file_reference(cache):
            cache = config_file.load_section(cache, CacheConfig, "cache")
        check_world_size(parallel, args.parallel, world)
        for value, cls, name in ((cache, CacheConfig, "cache"), (parallel, ParallelConfig, "parallel"),
                                 (quantize, QuantConfig, "quantize")):
            coerce(value, cls, name)  # the configs' own checks, before the model loads
    except ValueError as exc:  # cachedit's validation: a ValueError naming the field
        raise UserError(str(exc)) from None
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend.dist_backend)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=rank != 0)
    try:
        cachedit.accelerate(pipe, device=backend.name, cache=cache, parallel=parallel, quantize=quantize,
                            compile=args.compile or None, attention=args.attention, config=args.config,
                            inference_mode=args.inference_mode)
    except ValueError as exc:  # refused before anything changed: the flags do not fit this model
        raise UserError(str(exc)) from None
    start = time.perf_counter()
    image = pipe(prompt=args.prompt, **call_kwargs(args.model, args.steps, args.seed))[0]
    seconds = time.perf_counter() - start
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"seed{args.seed}_steps{args.steps}"
        save_png(image, out / f"{stem}.png")
        record = {"prompt": args.prompt, "model": args.model, "steps": args.steps, "seed": args.seed,
                  "seconds": seconds, "world_size": world, "summary": cachedit.summary(pipe)}
        (out / f"{stem}.json").write_text(json.dumps(record, indent=2, default=str))
        print(f"{seconds:.2f} s -> {out / stem}.png, {out / stem}.json")
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


def save_png(image: torch.Tensor, path: Path, scale: int = 8) -> None:
    """Save the first image of a (N, C, H, W) batch in [0, 1], upscaled with nearest neighbours."""
    from PIL import Image

    pixels = image[0].detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    picture = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels)
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(path)
