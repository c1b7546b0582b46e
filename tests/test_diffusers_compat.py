"""Private diffusers names are used only through `cachedit/_diffusers_compat.py`, whose version check says plainly
when the installed diffusers is outside the tested range."""

from __future__ import annotations

import ast
import pathlib
import warnings

import pytest

from cachedit import _diffusers_compat as compat

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPAT = ROOT / "cachedit" / "_diffusers_compat.py"
# diffusers' public import points: its packages' __init__s (plus the documented logging module). Importing from one
# of its implementation modules (`diffusers.hooks.hooks`, `diffusers.models.embeddings`, ...) is reaching inside.
PUBLIC_MODULES = {"diffusers", "diffusers.hooks", "diffusers.models", "diffusers.pipelines", "diffusers.schedulers",
                  "diffusers.utils", "diffusers.utils.logging", "diffusers.quantizers"}
# Private attributes of diffusers objects (registries, hooks, state managers, model classes).
PRIVATE_ATTRIBUTES = {"_diffusers_hook", "fn_ref", "_is_stateful", "_get_child_registries", "_child_registries_cache",
                      "_hook_order", "_fn_refs", "_state_cache", "_state_cls", "_init_args", "_init_kwargs",
                      "_context", "_current_context", "_cp_plan", "_tp_plan", "_cache_config",
                      "_keep_in_fp32_modules", "TransformerBlockRegistry"}


def _sources():
    for folder in ("cachedit", "plugins"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path != COMPAT:
                yield path


def _private_uses(source: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "diffusers":
            names = [a.name for a in node.names]
            if node.module not in PUBLIC_MODULES or any(n.startswith("_") for n in names):
                found.append(f"{where}: from {node.module} import {', '.join(names)}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "diffusers" and alias.name not in PUBLIC_MODULES:
                    found.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES:
            found.append(f"{where}: .{node.attr}")
        elif isinstance(node, ast.ClassDef):
            for stmt in node.body:  # `_is_stateful = True` declared on a hook class
                targets = stmt.targets if isinstance(stmt, ast.Assign) else []
                found += [f"{where}: {t.id} =" for t in targets
                          if isinstance(t, ast.Name) and t.id in PRIVATE_ATTRIBUTES]
        elif isinstance(node, ast.Constant) and node.value in PRIVATE_ATTRIBUTES:  # getattr(x, "_diffusers_hook")
            found.append(f"{where}: {node.value!r}")
    return found


def test_only_the_compat_module_uses_private_diffusers_names():
    found = [use for path in _sources() for use in _private_uses(path.read_text(), str(path.relative_to(ROOT)))]
    assert not found, "use cachedit/_diffusers_compat.py for:\n" + "\n".join(found)


def test_the_scan_sees_what_it_forbids():
    sample = ("from diffusers.hooks.hooks import StateManager\nfrom diffusers import _x\n"
              "import diffusers.models.embeddings\n"
              "from diffusers import FluxPipeline\nfrom diffusers.hooks import ModelHook\n"
              "y = m._diffusers_hook\nz = getattr(m, '_cp_plan')\nclass H:\n    _is_stateful = True\n")
    assert len(_private_uses(sample, "sample.py")) == 6


def test_supported_version_passes_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_version("0.41.0")
        compat.check_version("0.42.1")


def test_older_diffusers_is_refused_with_the_range(monkeypatch):
    monkeypatch.delenv(compat.ALLOW_ENV, raising=False)
    with pytest.raises(ImportError, match=r"diffusers>=0\.41\.0,<0\.43.*found diffusers 0\.40\.0"):
        compat.check_version("0.40.0")


def test_older_diffusers_may_be_tried_on_request(monkeypatch):
    monkeypatch.setenv(compat.ALLOW_ENV, "1")
    with pytest.warns(UserWarning, match="untested"):
        compat.check_version("0.40.0")


def test_newer_diffusers_warns():
    with pytest.warns(UserWarning, match=r"found diffusers 0\.43\.0\.dev0.*untested"):
        compat.check_version("0.43.0.dev0")


def test_flux2_blocks_are_declared_on_every_supported_diffusers():
    from diffusers.models.transformers.transformer_flux2 import Flux2SingleTransformerBlock, Flux2TransformerBlock

    double, single = compat.block_metadata(Flux2TransformerBlock), compat.block_metadata(Flux2SingleTransformerBlock)
    assert (double.return_hidden_states_index, double.return_encoder_hidden_states_index) == (1, 0)
    assert (single.return_hidden_states_index, single.return_encoder_hidden_states_index) == (0, None)
