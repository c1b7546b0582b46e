"""The one Registry type behind the six extension points, and the CLI choices read from it."""

from __future__ import annotations

import argparse

import pytest

from cachedit import cli, generate, tune
from cachedit.cache.calibrators import CALIBRATORS, Calibrator
from cachedit.cache.policies import POLICIES, DBCache
from cachedit.registry import Registry, UnknownName, current_owner


def test_unknown_name_names_the_registry_and_lists_the_names():
    reg: Registry[int] = Registry("widget")
    reg.register("a", 1)
    reg.register("b", 2)
    with pytest.raises(UnknownName, match=r"widget 'c' is not registered; allowed values: 'a', 'b'") as info:
        reg.get("c")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="none registered"):
        Registry("empty").get("x")


def test_register_replaces_iterates_in_order_and_unregisters():
    reg: Registry[str] = Registry("widget")
    for name in ("b", "a", "c"):
        reg.register(name, name.upper())
    reg.register("a", "A2")
    assert list(reg) == reg.names() == ["b", "a", "c"] and len(reg) == 3
    assert reg.get("a") == "A2" and "a" in reg and "z" not in reg
    assert reg.items() == [("b", "B"), ("a", "A2"), ("c", "C")]
    reg.unregister("a")
    assert reg.names() == ["b", "c"]
    with pytest.raises(KeyError, match="widget 'a' is not registered"):
        reg.unregister("a")


def test_registrations_are_recorded_against_their_owner_and_forgotten_with_it():
    reg: Registry[str] = Registry("widget")
    reg.register("x", "core")
    token = current_owner.set("plug")
    try:
        reg.register("x", "plugin's")
        reg.register("y", "plugin only")
    finally:
        current_owner.reset(token)
    assert reg.get("x") == "plugin's" and reg.owner("x") == "plug" and reg.owner("y") == "plug"
    reg.forget("plug")
    assert reg.get("x") == "core" and reg.owner("x") is None and "y" not in reg


def test_check_refuses_the_wrong_kind_before_anything_changes():
    def check(name, item):
        if not isinstance(item, int):
            raise TypeError(f"widget {name!r} must be an int")

    reg: Registry[int] = Registry("widget", check=check)
    with pytest.raises(TypeError, match="widget 'a' must be an int"):
        reg.register("a", "one")
    with pytest.raises(TypeError, match="non-empty strings"):
        reg.register("", 1)
    assert reg.names() == []
    with pytest.raises(TypeError, match="Policy subclass"):
        POLICIES.register("bad", object)
    with pytest.raises(TypeError, match="Calibrator subclass"):
        CALIBRATORS.register("bad", DBCache)


def test_before_lookup_runs_before_every_read():
    calls = []
    reg: Registry[int] = Registry("widget", before_lookup=lambda: calls.append(1))
    reg.register("a", 1)
    assert calls == []  # registering reads nothing
    for read in (lambda: reg.get("a"), lambda: "a" in reg, reg.names, lambda: list(reg), reg.items):
        calls.clear()
        read()
        assert calls


def _parse(add_arguments, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_choices_follow_a_newly_registered_policy_and_calibrator(capsys):
    class Mine(DBCache):
        name = "test-mine"
        tune_thresholds = (0.5,)

        @classmethod
        def fit(cls, recorded):
            return {}

    class Forecaster(Calibrator):
        pass

    tune_argv = ("--speedup", "2", "--policies", "test-mine", "--calibrators", "test-forecaster")
    with pytest.raises(argparse.ArgumentError, match="invalid choice: 'test-mine'"):
        _parse(tune.add_arguments, *tune_argv)
    POLICIES.register(Mine.name, Mine)
    CALIBRATORS.register("test-forecaster", Forecaster)
    try:
        args = _parse(tune.add_arguments, *tune_argv)
        assert args.policies == ["test-mine"] and args.calibrators == ["test-forecaster"]
        assert _parse(generate.add_arguments, "--calibrator", "test-forecaster").calibrator == "test-forecaster"
        with pytest.raises(SystemExit):
            cli.main(["calibrate", "--help"])
        assert "{teacache,magcache,test-mine,schedule}" in capsys.readouterr().out
    finally:
        POLICIES.unregister(Mine.name)
        CALIBRATORS.unregister("test-forecaster")
    with pytest.raises(argparse.ArgumentError, match="invalid choice: 'test-forecaster'"):
        _parse(generate.add_arguments, "--calibrator", "test-forecaster")
