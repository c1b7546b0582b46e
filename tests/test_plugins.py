"""Plugin loading: isolation of broken plugins, selection, strict mode, duplicate names, third-party registration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cachedit
from cachedit.config import CompileConfig, CompileTarget
from cachedit.quant.spec import QuantSpec

from .conftest import make_distribution, run_python

REPO = Path(__file__).resolve().parents[1]
LIST_BACKENDS = "import cachedit, json; print(json.dumps([r.__dict__ for r in cachedit.backends()]))"

GOOD_PLUGIN = """
import cachedit
@cachedit.hookimpl
def cachedit_register_backends(registry):
    registry.add(cachedit.Backend(name="{name}", device_type="cpu", dist_backend="gloo", priority={priority}))
"""


def _records(proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    return {r["name"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}


def test_builtin_backends_listed_with_reasons(fresh_plugins):
    records = {r.name: r for r in cachedit.backends()}
    assert records["cpu_ref"].available and records["cpu_ref"].reason == ""
    if not torch.cuda.is_available():
        assert not records["cuda"].available and "CUDA" in records["cuda"].reason
    assert not records["ascend"].available and "torch_npu" in records["ascend"].reason


def test_cli_backends_table():
    out = subprocess.run([sys.executable, "-m", "cachedit", "backends"], capture_output=True, text=True, check=True)
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[2:]}
    assert rows["cpu_ref"].split()[2] == "yes"
    assert rows["cuda"].split()[2] == "no" or torch.cuda.is_available()
    assert rows["ascend"].split()[2] == "no" and "torch_npu" in rows["ascend"]


def test_plugin_whose_import_raises_is_reported_not_fatal(tmp_path):
    site = make_distribution(tmp_path, "broken-plugin", {"broken_plugin": "raise RuntimeError('boom at import')"},
                             {"broken": "broken_plugin"})
    records = _records(run_python(LIST_BACKENDS, site))
    assert not records["broken"]["available"] and "boom at import" in records["broken"]["error"]
    assert records["cpu_ref"]["available"]

    strict = run_python(LIST_BACKENDS, site, env={"CACHEDIT_STRICT_PLUGINS": "1"})
    assert strict.returncode != 0 and "PluginError" in strict.stderr and "boom at import" in strict.stderr
    assert run_python("import cachedit", site, env={"CACHEDIT_STRICT_PLUGINS": "1"}).returncode == 0


def test_plugin_whose_registration_raises_is_reported(tmp_path):
    source = """
    import cachedit
    @cachedit.hookimpl
    def cachedit_register_backends(registry):
        raise ValueError("cannot declare")
    """
    site = make_distribution(tmp_path, "bad-register", {"bad_register": source}, {"badreg": "bad_register"})
    records = _records(run_python(LIST_BACKENDS, site))
    assert "cannot declare" in records["badreg"]["error"] and records["cpu_ref"]["available"]


def test_plugin_with_invalid_hook_signature_is_reported(tmp_path):
    source = """
    import cachedit
    @cachedit.hookimpl
    def cachedit_register_backends(registry, not_an_argument):
        pass
    """
    site = make_distribution(tmp_path, "bad-sig", {"bad_sig": source}, {"badsig": "bad_sig"})
    records = _records(run_python(LIST_BACKENDS, site))
    assert "not_an_argument" in records["badsig"]["error"]


@pytest.mark.parametrize("selection,loaded,excluded", [
    ("cpu_ref", {"cpu_ref"}, {"cuda", "ascend", "extra"}),
    ("cpu_ref,extra", {"cpu_ref", "extra_cpu"}, {"cuda", "ascend"}),
    ("-ascend,-extra", {"cpu_ref", "cuda"}, {"ascend", "extra"}),
])
def test_env_selects_plugins(tmp_path, selection, loaded, excluded):
    site = make_distribution(tmp_path, "extra", {"extra_plugin": GOOD_PLUGIN.format(name="extra_cpu", priority=0)},
                             {"extra": "extra_plugin"})
    records = _records(run_python(LIST_BACKENDS, site, env={"CACHEDIT_PLUGINS": selection}))
    declared = {n for n, r in records.items() if r["device_type"]}
    assert declared == loaded
    for name in excluded:
        assert "excluded by CACHEDIT_PLUGINS" in records[name]["reason"]


def test_duplicate_backend_name_resolved_by_priority_with_warning(tmp_path):
    site = make_distribution(tmp_path, "dup", {
        "dup_high": GOOD_PLUGIN.format(name="cpu_ref", priority=5),
        "dup_low": GOOD_PLUGIN.format(name="cpu_ref", priority=-5),
    }, {"dup_high": "dup_high", "dup_low": "dup_low"})
    code = "import warnings\nwarnings.simplefilter('always')\n" + LIST_BACKENDS
    proc = run_python(code, site)
    assert _records(proc)["cpu_ref"]["plugin"] == "dup_high"
    assert "declared by several plugins; using 'dup_high' (priority 5)" in proc.stderr
    # Same priority: the winner is decided by plugin name, independent of install order.
    site2 = make_distribution(tmp_path / "tie", "tie", {"tie_plugin": GOOD_PLUGIN.format(name="cpu_ref", priority=0)},
                              {"aaa_tie": "tie_plugin"})
    assert _records(run_python(LIST_BACKENDS, site2))["cpu_ref"]["plugin"] == "aaa_tie"


def test_extension_that_raises_is_named_recorded_and_ignored(fresh_plugins):
    class Faulty:
        @cachedit.hookimpl
        def cachedit_attention_kernels(self, backend):
            raise RuntimeError("kernel table corrupt")

    fresh_plugins.register(Faulty(), "faulty")
    with pytest.warns(UserWarning, match="plugin 'faulty' is ignored: raised in cachedit_attention_kernels"):
        kernels = fresh_plugins.attention_kernels(fresh_plugins.backends["cpu_ref"])
    assert [k.name for k in kernels] == ["math", "torch_sdpa"]
    assert "RuntimeError: kernel table corrupt" in fresh_plugins.failed["faulty"]


# -- pluggy as pluggy: routing, historic registration, firstresult, tryfirst / trylast, wrappers ------------------
OVERRIDE = cachedit.AttentionKernel(name="override", fn=lambda *a, **k: None, priority=7)


class CpuRefOverride:
    """Declares `cpu_ref` again, at a higher priority, with its own kernel and no other hook."""

    @cachedit.hookimpl
    def cachedit_register_backends(self, registry):
        registry.add(cachedit.Backend(name="cpu_ref", device_type="cpu", dist_backend="gloo", priority=5))

    @cachedit.hookimpl
    def cachedit_attention_kernels(self, backend):
        return [OVERRIDE]


def test_overriding_plugin_serves_its_backend_alone(fresh_plugins):
    from cachedit.parallel.communicator import Communicator

    with pytest.warns(UserWarning, match="declared by several plugins; using 'override'"):
        fresh_plugins.register(CpuRefOverride(), "override")  # historic: asked for its backends as it registers
    backend = fresh_plugins.backends["cpu_ref"]
    assert backend.plugin == "override"
    # cpu_ref's own plugin is asked nothing about the backend it lost: no `math`, the default communicator
    assert [k.name for k in fresh_plugins.attention_kernels(backend)] == ["override", "torch_sdpa"]
    assert type(fresh_plugins.communicator(backend)) is Communicator
    assert fresh_plugins.quantized_linear(backend, QuantSpec("int8", "row")) is None
    # and the plugins that lost nothing keep their own answers
    cuda = fresh_plugins.backends["cuda"]
    assert type(fresh_plugins.communicator(cuda)).__name__ == "NcclCommunicator"


def test_plugins_answer_only_for_their_own_backends(fresh_plugins):
    """No plugin carries a name guard, and none is asked about another plugin's backend."""
    import cachedit_cpu_ref.plugin as cpu_ref_plugin

    cuda = fresh_plugins.backends["cuda"]
    assert cpu_ref_plugin.cachedit_communicator(cuda, None) is not None  # it would answer, were it asked
    assert type(fresh_plugins.communicator(cuda)).__name__ == "NcclCommunicator"
    assert "math" not in {k.name for k in fresh_plugins.attention_kernels(cuda)}
    assert type(fresh_plugins.communicator(fresh_plugins.backends["cpu_ref"])).__name__ == "GlooCommunicator"


def test_firstresult_tryfirst_trylast_and_wrappers_follow_pluggy(fresh_plugins):
    from cachedit.parallel.communicator import Communicator

    class Mine(Communicator):
        pass

    class Late:
        @cachedit.hookimpl(trylast=True)
        def cachedit_communicator(self, backend, group):
            return Mine(group)

    class Early:
        @cachedit.hookimpl(tryfirst=True)
        def cachedit_communicator(self, backend, group):
            return Mine(group)

    class Wrapper:
        @cachedit.hookimpl(wrapper=True)
        def cachedit_compile_options(self, backend, target):
            answers = yield
            return [{"dynamic": True}, *answers]  # call order: first answers override later ones

    cpu_ref = fresh_plugins.backends["cpu_ref"]
    fresh_plugins.register(Late(), "late")
    assert type(fresh_plugins.communicator(cpu_ref)).__name__ == "GlooCommunicator"  # the owner answers first
    fresh_plugins.register(Early(), "early")
    assert type(fresh_plugins.communicator(cpu_ref)) is Mine  # firstresult: the tryfirst answer wins alone
    target = CompileTarget("transformer_block", "flux", CompileConfig())
    assert fresh_plugins.compile_options(cpu_ref, target)["dynamic"] is False
    fresh_plugins.register(Wrapper(), "wrapper")
    assert fresh_plugins.compile_options(cpu_ref, target)["dynamic"] is True


def test_misspelled_hook_is_reported_with_the_likely_name(fresh_plugins):
    class Typo:
        @cachedit.hookimpl
        def cachedit_register_backends(self, registry):
            registry.add(cachedit.Backend(name="typo_cpu", device_type="cpu", dist_backend="gloo"))

        @cachedit.hookimpl
        def cachedit_atention_kernels(self, backend):
            return []

    class Newer:
        @cachedit.hookimpl(optionalhook=True)
        def cachedit_hook_of_a_later_version(self, backend):
            return []

    with pytest.warns(UserWarning, match="unknown hook"):
        fresh_plugins.register(Typo(), "typo")
    assert "'cachedit_atention_kernels' (did you mean 'cachedit_attention_kernels'?)" in fresh_plugins.failed["typo"]
    assert "typo_cpu" not in fresh_plugins.backends  # a failed plugin's backends go with it
    fresh_plugins.register(Newer(), "newer")
    assert "newer" not in fresh_plugins.failed


@pytest.fixture(scope="module")
def example_site(tmp_path_factory):
    """The out-of-tree example backend, installed for real by pip into a private target directory."""
    site = tmp_path_factory.mktemp("example-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(REPO / "examples" / "backend_plugin")], check=True)
    return site


def test_third_party_plugin_registers_through_entry_point(example_site):
    record = _records(run_python(LIST_BACKENDS, example_site))["example_cpu"]
    assert record["available"] and record["plugin"] == "example"
    code = """
    import torch, cachedit
    from cachedit.testing.tiny import tiny_pipeline, tiny_call_kwargs
    pipe = tiny_pipeline("flux")
    base = pipe("a cat", **tiny_call_kwargs("flux")).images
    cachedit.accelerate(pipe, device="example_cpu")
    out = pipe("a cat", **tiny_call_kwargs("flux")).images
    print(cachedit.summary(pipe)["attention"]["kernels"], float((out - base).abs().max()))
    """
    proc = run_python(code, example_site)
    assert proc.returncode == 0, proc.stderr
    kernels, err = proc.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert kernels == "{'transformer': ['chunked']}" and float(err) < 1e-4


def test_conformance_suite_runs_against_third_party_backend(example_site):
    proc = run_python("import sys, pytest; sys.exit(pytest.main(['--pyargs', 'cachedit.testing.conformance', "
                      "'-q', '-p', 'no:cacheprovider', '--cachedit-backend', 'example_cpu']))", example_site)
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and "passed" in summary
