"""accelerate's arguments from YAML / JSON files and dicts: the config dataclasses' fields, nothing else."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import cachedit
from cachedit.config_file import dump, load
from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

CONFIG = {"device": "cpu_ref", "cache": {"Fn": 1, "Bn": 0, "residual_diff_threshold": 100.0, "warmup_steps": 2,
                                         "calibrator": "taylorseer"},
          "compile": {"backend": "eager"}}


def _run(pipe):
    return pipe(prompt="a photo of a cat", **tiny_call_kwargs("flux", num_inference_steps=5))[0]


@pytest.mark.parametrize("fmt", ["yaml", "json", "dict"])
def test_a_config_file_accelerates_like_the_same_arguments(tmp_path, fmt):
    if fmt == "dict":
        source = CONFIG
    else:
        source = tmp_path / f"c.{fmt}"
        source.write_text(yaml.safe_dump(CONFIG) if fmt == "yaml" else json.dumps(CONFIG))
    by_args = tiny_pipeline("flux")
    cachedit.accelerate(by_args, **CONFIG)
    by_file = tiny_pipeline("flux")
    cachedit.accelerate(by_file, config=source)
    assert torch.equal(_run(by_file), _run(by_args))
    assert cachedit.summary(by_file)["cache"]["config"] == cachedit.summary(by_args)["cache"]["config"]


def test_dump_round_trips(tmp_path):
    effective = dump(load(CONFIG))
    path = tmp_path / "dumped.yaml"
    path.write_text(yaml.safe_dump(effective))
    assert dump(load(path)) == effective
    assert effective["cache"]["warmup_steps"] == 2 and effective["quantize"] is None


BAD = [
    ({"cache": {"threshold": 0.1}}, r"config.cache: unknown field\(s\) \['threshold'\]"),
    ({"cahce": {}}, r"config: unknown key\(s\) \['cahce'\]; allowed keys"),
    ({"device": 3}, r"config.device=3 is invalid"),
    ({"cache": {"residual_diff_threshold": -1}}, r"CacheConfig.residual_diff_threshold"),
]


@pytest.mark.parametrize("data,message", BAD)
def test_bad_config_is_refused_before_anything_changes(data, message):
    pipe = tiny_pipeline("flux")
    with pytest.raises(ValueError, match=message):
        cachedit.accelerate(pipe, config=data)
    assert cachedit.summary(pipe) == {"accelerated": False} and not hasattr(pipe.transformer, "_diffusers_hook")


def test_bad_files(tmp_path):
    for name, text, message in [("a.txt", "", "must end in one of"), ("b.yaml", "- 1\n- 2\n", "must hold a mapping"),
                                ("c.json", "{", "cannot be parsed")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            load(tmp_path / name)
    with pytest.raises(ValueError, match="no such file"):
        load(tmp_path / "missing.yaml")


def test_cache_argument_takes_a_file_of_cache_fields(tmp_path):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(CONFIG["cache"]))
    pipe = tiny_pipeline("flux")
    cachedit.accelerate(pipe, device="cpu_ref", cache=str(path))
    assert cachedit.summary(pipe)["cache"]["config"]["calibrator"] == "taylorseer"


def test_cli_config_dump_and_generate_with_a_config_file(tmp_path, capsys):
    from cachedit.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"device": "cpu_ref", "cache": {"residual_diff_threshold": 0.3, "warmup_steps": 2}}))
    assert main(["config", "--dump", "--config", str(path)]) == 0
    dumped = yaml.safe_load(capsys.readouterr().out)
    assert dumped["device"] == "cpu_ref" and dumped["cache"]["residual_diff_threshold"] == 0.3
    assert dumped["cache"]["Fn"] == cachedit.CacheConfig().Fn  # defaults filled in: the effective config
    assert main(["generate", "--config", str(path), "--steps", "6", "--out", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "seed0_steps6.json").read_text())
    assert record["summary"]["cache"]["config"]["residual_diff_threshold"] == 0.3
    (tmp_path / "bad.yaml").write_text("cahce: {}\n")
    with pytest.raises(SystemExit) as info:
        main(["config", "--config", str(tmp_path / "bad.yaml")])
    assert info.value.code == 2 and "unknown key(s) ['cahce']" in capsys.readouterr().err
