"""accelerate's arguments from a file (YAML or JSON) or a dict, with the fields of the config dataclasses.

    device: cpu_ref
    cache: {Fn: 1, Bn: 0, residual_diff_threshold: 0.12, calibrator: taylorseer}
    compile: {backend: eager}

Top-level keys are `accelerate`'s keyword arguments; each section takes exactly the fields of its config
class (`CacheConfig`, `ParallelConfig`, `QuantConfig`, `CompileConfig`), or a preset name where that class
has presets. Unknown keys are errors naming the key. YAML is read with `yaml.safe_load` (data only). A
file holding one config's fields alone (such as a tuned cache config) is read by `load_section`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .config import CacheConfig, CompileConfig, ParallelConfig, QuantConfig, coerce

SECTIONS = {"cache": CacheConfig, "parallel": ParallelConfig, "quantize": QuantConfig, "compile": CompileConfig}
KEYS = ("device", "attention", "inference_mode", *SECTIONS)
SUFFIXES = (".yaml", ".yml", ".json")


def read(source: str | Path | dict, what: str = "config") -> dict:
    """The mapping in a YAML / JSON file, or `source` itself when it is a dict."""
    if isinstance(source, dict):
        return dict(source)
    if not isinstance(source, (str, Path)):
        raise ValueError(f"{what}={source!r} is invalid; allowed values: a dict or a path to a "
                         f"{'/'.join(SUFFIXES)} file")
    path = Path(source)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{what}={str(source)!r}: the file name must end in one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise ValueError(f"{what}={str(source)!r}: no such file")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # the parser's own message says where
        raise ValueError(f"{what}={str(source)!r} cannot be parsed: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{what}={str(source)!r} must hold a mapping of fields, not {type(data).__name__}")
    return data


def load(source: str | Path | dict) -> dict[str, Any]:
    """accelerate's keyword arguments from `source`, every section validated into its frozen config."""
    data = read(source)
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ValueError(f"config: unknown key(s) {unknown}; allowed keys: {list(KEYS)}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS:
            out[key] = coerce(value, SECTIONS[key], f"config.{key}")
        elif key == "inference_mode":
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"config.{key}={value!r} is invalid; allowed values: true, false")
            out[key] = value
        elif value is not None and not isinstance(value, str):
            raise ValueError(f"config.{key}={value!r} is invalid; allowed values: a string")
        else:
            out[key] = value
    return out


def merge(found: dict[str, Any], **given: Any) -> dict[str, Any]:
    """accelerate's arguments: those `given` explicitly win over the file's (`device="auto"` and None count
    as not given)."""
    out = dict(given)
    for key, value in found.items():
        if given.get(key) is None or (key == "device" and given.get(key) == "auto"):
            out[key] = value
    return out


def is_file_reference(value: Any) -> bool:
    """A string naming a config file (rather than a preset name)."""
    return isinstance(value, (str, Path)) and str(value).lower().endswith(SUFFIXES)


def load_section(source: str | Path, cls: type, what: str):
    """One config from a file of its fields alone, e.g. a tuned cache config."""
    return coerce(read(source, what), cls, what)


def dump(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The effective configuration as plain data (what `cachedit config --dump` prints)."""
    out = {}
    for key in KEYS:
        value = kwargs.get(key)
        if key == "inference_mode" and value is None:
            value = True  # accelerate's default
        if dataclasses.is_dataclass(value):
            value = {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        out[key] = value
    return out


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
