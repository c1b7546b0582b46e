"""Command-line inputs checked before any work starts: argparse types and the user-error exception.

A user error (a bad flag value, a missing model folder, an output path that cannot be written,
a config field cachedit refuses) is reported by `cachedit.cli` as one line on stderr with exit
status 2, argparse's convention; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

class UserError(Exception):
    """A mistake in the command line or its inputs: one line on stderr, exit status 2."""


def positive_int(text: str) -> int:
    """An integer >= 1 (a step count, a repeat count, a degree)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid; allowed values: an integer >= 1")
    return value


def finite_float(text: str) -> float:
    """A finite number (argparse's `float` accepts 'nan' and 'inf')."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed values: a finite number")
    return value


def _can_write_in(folder: Path) -> bool:
    """A file can be created in `folder`, tried for real (permission bits say nothing to root, or on /proc)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _creatable(path: Path) -> bool:
    """The nearest existing ancestor of `path` is a folder that can be written, so `path` can be created."""
    for parent in path.absolute().parents:
        if parent.exists():
            return parent.is_dir() and _can_write_in(parent)
    return False


def writable_dir(text: str) -> str:
    """An output folder that exists and is writable, or can be created (nothing is created here)."""
    path = Path(text)
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
        if not _can_write_in(path):
            raise argparse.ArgumentTypeError(f"{text!r} is not writable")
    elif not _creatable(path):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be created (its nearest existing parent is not a "
                                         "writable folder)")
    return text


def writable_file(text: str) -> str:
    """An output file that can be written: not a folder, in a writable (or creatable) folder."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; allowed values: a file path")
    if path.exists():
        try:
            with open(path, "a"):
                pass
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not writable: {exc.strerror}") from None
    else:
        writable_dir(str(path.parent))
    return text


def model_source(*builtins: str):
    """An argparse type: one of `builtins` (models shipped with cachedit) or an existing diffusers
    pipeline folder (one with a model_index.json)."""

    def check(text: str) -> str:
        if text in builtins:
            return text
        path = Path(text)
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is not a folder; allowed values: "
                                             f"{', '.join(map(repr, builtins))} or a diffusers pipeline folder")
        if not (path / "model_index.json").is_file():
            raise argparse.ArgumentTypeError(f"{text!r} has no model_index.json: not a diffusers pipeline folder")
        return text

    check.__name__ = "model"  # argparse names the type in its message: "invalid model value"
    return check
