"""`cachedit backends | generate | bench | calibrate | config | conformance | doctor | demo`: the command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

from .arguments import UserError, finite_float, model_source, positive_int, writable_dir, writable_file

# Messages of other libraries that say nothing to a cachedit user, silenced for the command line only
# (never on `import cachedit`): torchao's CUDA-only kernels that cannot load on a CPU, torch's notice about
# torchao registering enums, diffusers' torchao serialisation notice, transformers' torchvision fallbacks.
HARMLESS_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer",
                    "transformers.utils.import_utils")
HARMLESS_WARNINGS = ((FutureWarning, r"`\w+` is deprecated and will be removed in version"),
                     (DeprecationWarning, r"`torch.jit.script_method` is deprecated"))


def quiet_third_party() -> None:
    """The command line prints its own output and progress, not other libraries' loading bars and notices."""
    for name in HARMLESS_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # the bench's peer logs every hook it installs and removes
    for category, message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()



class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other user error (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def cmd_backends(args) -> int:
    from . import backends

    records = backends()
    if args.json:
        print(json.dumps([r.__dict__ for r in records], indent=2))
        return 0
    rows = [[r.name, r.plugin, "yes" if r.available else "no", r.device_type, r.dist_backend, r.priority,
             r.error or r.reason] for r in records]
    print(_table(rows, ["backend", "plugin", "available", "device", "dist", "priority", "reason / error"]))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(steps=args.steps, out=args.out)


def cmd_calibrate(args) -> int:
    from .benchmarking import model_and_call
    from .cache.calibrate import calibrate

    load, call, prompts = model_and_call(args.model)
    runs = [dict(prompt=prompts[i % len(prompts)], **call(args.steps, i)) for i in range(args.runs)]
    extra = {"speedup": args.speedup} if args.policy == "schedule" else {}
    options = calibrate(load(), args.policy, runs, **extra)
    text = json.dumps(options, indent=2)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(text)
    print(text)
    print(f"use: cache=dict(Fn=0, policy={args.policy!r}, policy_options=<the JSON above>)", file=sys.stderr)
    return 0


def cmd_conformance(args) -> int:
    import pytest

    extra = [f"--cachedit-backend={b}" for b in args.backend]
    return pytest.main(["--pyargs", "cachedit.testing.conformance", "-p", "no:cacheprovider", "-q", *extra])


def cmd_config(args) -> int:
    import yaml

    from . import config_file

    try:
        found = config_file.load(args.config) if args.config else {}
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(yaml.safe_dump(config_file.dump(found), sort_keys=False).rstrip())
    return 0


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()  # first: building the parser imports the libraries that talk
    parser = _Parser(prog="cachedit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backends", help="list installed backends, their availability and load errors")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_backends)
    p = sub.add_parser("demo", help="run a pipeline plain and accelerated, print the comparison table")
    p.add_argument("--steps", type=positive_int, default=28)
    p.add_argument("--out", default="out/demo", type=writable_dir)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("generate", help="generate one image, accelerated, and save it with a JSON record")
    from .generate import add_arguments, run as run_generate

    add_arguments(p)
    p.set_defaults(func=run_generate)
    p = sub.add_parser("bench", help="cache policies and peers side by side: JSON, markdown table, PNG frontier")
    from .benchmark import add_arguments as bench_arguments, run as run_bench

    bench_arguments(p)
    p.set_defaults(func=run_bench)
    p = sub.add_parser("calibrate", help="fit TeaCache's polynomial or MagCache's ratios, or search a schedule's "
                       "computed steps, from uncached runs")
    p.add_argument("--model", default="reference", type=model_source("reference", "tiny"),
                   help="'reference', 'tiny' or a pipeline folder")
    from .cache.calibrate import calibrated_policies

    p.add_argument("--policy", choices=[*calibrated_policies(), "schedule"], required=True)
    p.add_argument("--speedup", type=finite_float, default=3.0,
                   help="schedule: the ideal speedup its computed steps are searched for")
    p.add_argument("--steps", type=positive_int, default=28)
    p.add_argument("--runs", type=positive_int, default=4, help="uncached runs (prompts cycle, seeds differ)")
    p.add_argument("--out", default=None, type=writable_file, help="write the options as JSON here")
    p.set_defaults(func=cmd_calibrate)
    p = sub.add_parser("tune", help="search the cache configurations for a target speedup or PSNR, save the best")
    from .tune import add_arguments as tune_arguments, run as run_tune

    tune_arguments(p)
    p.set_defaults(func=run_tune)
    p = sub.add_parser("conformance", help="run the backend conformance suite against installed backends")
    p.add_argument("--backend", action="append", default=[], help="only this backend (repeatable)")
    p.set_defaults(func=cmd_conformance)
    p = sub.add_parser("config", help="print the effective accelerate configuration of a config file (YAML)")
    p.add_argument("--dump", action="store_true", help="print every field, defaults included (the default)")
    p.add_argument("--config", default=None, help="a YAML / JSON file of accelerate's arguments")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("doctor", help="check this machine's backends: kernels, quantized paths, timings, JSON out")
    p.add_argument("--out", default="out/doctor.json", help="write the report as JSON here")
    p.add_argument("--backend", action="append", default=[], help="only this backend (repeatable)")
    p.add_argument("--fast", action="store_true", help="tiny shapes and a conformance subset (for tests)")
    p.add_argument("--no-conformance", action="store_true", help="skip the conformance suite")
    p.set_defaults(func=lambda a: __import__("cachedit.doctor", fromlist=["main"]).main(a))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:  # only user errors are one line; anything else is a bug and keeps its traceback
        parser.exit(2, f"cachedit {args.command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
