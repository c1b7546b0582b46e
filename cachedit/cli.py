"""`cachedit backends | generate | bench | calibrate | conformance | demo`: the command line."""

from __future__ import annotations

import argparse
import json
import sys

from .arguments import UserError, model_source, positive_int, writable_dir, writable_file


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
    from .benchmark import model_and_call
    from .cache.calibrate import calibrate

    load, call, prompts = model_and_call(args.model)
    runs = [dict(prompt=prompts[i % len(prompts)], **call(args.steps, i)) for i in range(args.runs)]
    options = calibrate(load(), args.policy, runs)
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


def main(argv: list[str] | None = None) -> int:
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
    p = sub.add_parser("calibrate", help="fit TeaCache's polynomial or MagCache's ratios from uncached runs")
    p.add_argument("--model", default="reference", type=model_source("reference", "tiny"),
                   help="'reference', 'tiny' or a pipeline folder")
    p.add_argument("--policy", choices=["teacache", "magcache"], required=True)
    p.add_argument("--steps", type=positive_int, default=28)
    p.add_argument("--runs", type=positive_int, default=4, help="uncached runs (prompts cycle, seeds differ)")
    p.add_argument("--out", default=None, type=writable_file, help="write the options as JSON here")
    p.set_defaults(func=cmd_calibrate)
    p = sub.add_parser("conformance", help="run the backend conformance suite against installed backends")
    p.add_argument("--backend", action="append", default=[], help="only this backend (repeatable)")
    p.set_defaults(func=cmd_conformance)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:  # only user errors are one line; anything else is a bug and keeps its traceback
        parser.exit(2, f"cachedit {args.command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
