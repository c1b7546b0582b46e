"""CLI user errors: one line on stderr naming the flag or field, exit status 2, no traceback, and nothing
written; real bugs keep their tracebacks. In-process through `cachedit.cli.main` (fast), plus one
subprocess run proving the same end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cachedit import generate
from cachedit.cli import main


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "not_a_pipeline").mkdir()
    return tmp_path


# (argv, WORLD_SIZE, what the one line must say)
CASES = [
    (["frob"], 1, "invalid choice: 'frob'"),
    (["generate", "--steps", "0"], 1, "argument --steps: 0 is invalid; allowed values: an integer >= 1"),
    (["generate", "--steps", "many"], 1, "argument --steps: 'many' is not an integer"),
    (["generate", "--model", "{tmp}/missing"], 1, "argument --model: '{tmp}/missing' is not a folder"),
    (["generate", "--model", "{tmp}/not_a_pipeline"], 1, "has no model_index.json"),
    (["generate", "--out", "{tmp}/a_file"], 1, "argument --out: '{tmp}/a_file' exists and is not a folder"),
    (["generate", "--out", "/proc/cachedit-out"], 1, "argument --out: '/proc/cachedit-out' cannot be created"),
    (["generate", "--threshold", "nan"], 1, "argument --threshold: 'nan' is invalid; allowed values: a finite number"),
    (["generate", "--quantize", "fp4"], 1, "argument --quantize: invalid choice: 'fp4'"),
    (["generate", "--calibrator", "psychic"], 1, "argument --calibrator: invalid choice: 'psychic'"),
    (["generate", "--device", "nope"], 1, "device='nope' is not an installed backend"),
    (["generate", "--cache", "turbo"], 1, "cache='turbo' is not a preset"),
    (["generate", "--warmup", "-1"], 1, "CacheConfig.warmup_steps=-1 is invalid"),
    (["generate", "--parallel", "ulysses"], 1, "--parallel ulysses splits nothing over WORLD_SIZE=1"),
    (["generate", "--parallel", "ring", "--degree", "4"], 2, "needs 4 processes, but WORLD_SIZE=2"),
    (["generate"], 2, "WORLD_SIZE=2 processes but --parallel none"),
    (["generate", "--parallel", "tp", "--tensor", "2"], 2, "--tensor=2 combines with --parallel ulysses / ring / usp"),
    (["generate", "--parallel", "usp", "--ulysses", "3"], 4, "--ulysses=3 must divide --degree=4"),
    (["generate", "--parallel", "ulysses", "--parallel-vae"], 1, "ParallelConfig.vae=True is invalid"),
    (["bench", "--repeats", "0"], 1, "argument --repeats: 0 is invalid"),
    (["bench", "--model", "{tmp}/missing"], 1, "argument --model: '{tmp}/missing' is not a folder"),
    (["bench", "--out", "{tmp}/a_file"], 1, "argument --out"),
    (["calibrate", "--policy", "magcache", "--out", "{tmp}"], 1, "argument --out: '{tmp}' is a folder"),
    (["calibrate", "--policy", "psychic"], 1, "argument --policy: invalid choice"),
    (["calibrate", "--policy", "magcache", "--runs", "0"], 1, "argument --runs: 0 is invalid"),
    (["calibrate"], 1, "the following arguments are required: --policy"),
    (["demo", "--steps", "-2"], 1, "argument --steps: -2 is invalid"),
    (["demo", "--out", "{tmp}/a_file"], 1, "argument --out"),
    (["backends", "--tabel"], 1, "unrecognized arguments: --tabel"),
]


@pytest.mark.parametrize("argv,world,message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_user_error_is_one_line_and_exit_2(paths, capsys, monkeypatch, argv, world, message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setattr(generate, "load_pipeline", lambda model: pytest.fail("the model loaded before the check"))
    argv = [a.format(tmp=paths) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and err.startswith("cachedit") and ": error: " in err, err
    assert message.format(tmp=paths) in err
    assert sorted(p.name for p in paths.iterdir()) == ["a_file", "not_a_pipeline"]  # nothing written


@pytest.mark.parametrize("argv,message", [
    (["--attention", "nope"], "attention='nope' is not a kernel of this backend; allowed values: 'auto'"),
    (["--Fn", "9"], "CacheConfig.Fn + CacheConfig.Bn = 9 exceeds the model's 8 transformer blocks"),
], ids=["attention", "Fn"])
def test_flags_that_do_not_fit_the_model_are_user_errors(tmp_path, capsys, argv, message):
    """Refused by accelerate's validation once the model is known: still one line, exit 2, nothing written."""
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--steps", "1", "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and message in err[-1] and not any("Traceback" in line for line in err)
    assert not (tmp_path / "out").exists()


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(model):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(generate, "load_pipeline", broken)
    with pytest.raises(RuntimeError, match="a bug, not a user error"):
        main(["generate", "--out", str(tmp_path)])


def test_end_to_end_one_line_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cachedit", "generate", "--steps", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("cachedit generate: error: argument --steps: 0 is invalid; "
                                                    "allowed values: an integer >= 1 (see cachedit generate --help)")
