"""pytest plugin (entry point `pytest11`): the `cachedit_backend` fixture, parametrized over every
installed backend. An unavailable backend, or a plugin that failed to load, shows as skipped
with its reason. `--cachedit-backend NAME` (repeatable) restricts the run to those backends.

Run the shipped conformance suite against your backend with one command:

    pytest --pyargs cachedit.testing.conformance --cachedit-backend mybackend
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("cachedit")
    group.addoption("--cachedit-backend", action="append", default=[], metavar="NAME",
                    help="run cachedit backend tests only for this backend (repeatable)")


def _backend_params(config):
    from cachedit.plugins import manager

    pm = manager()
    wanted = config.getoption("--cachedit-backend") or None
    params = []
    for name, backend in sorted(pm.backends.items()):
        if wanted and name not in wanted:
            continue
        ok, reason = backend.probe()
        marks = () if ok else (pytest.mark.skip(reason=f"backend {name!r} unavailable: {reason}"),)
        params.append(pytest.param(backend, id=name, marks=marks))
    for name, error in sorted(pm.failed.items()):
        if not wanted or name in wanted:
            params.append(pytest.param(None, id=name, marks=(pytest.mark.skip(reason=f"plugin {name!r} failed to load: {error}"),)))
    for name in wanted or ():
        if name not in pm.backends and name not in pm.failed:
            raise pytest.UsageError(f"--cachedit-backend {name!r} is not installed; installed: {sorted(pm.backends)}")
    return params


def pytest_generate_tests(metafunc):
    if "cachedit_backend" in metafunc.fixturenames:
        metafunc.parametrize("cachedit_backend", _backend_params(metafunc.config), scope="session")
