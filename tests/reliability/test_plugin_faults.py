"""A plugin-fault matrix: each fault is recorded against the plugin's name, the plugin is ignored, and
every other backend keeps working; `cachedit.backends()` and `cachedit backends` never crash."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import cachedit
from cachedit.parallel.communicator import Communicator
from cachedit.plugins import PluginError, PluginManager
from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

from ..conftest import make_distribution

HEADER = "import sys, torch, cachedit\nfrom cachedit import Backend, hookimpl\n"
DECLARE = """
@hookimpl
def cachedit_register_backends(registry):
    registry.add(Backend(name="{name}", device_type="cpu", dist_backend="gloo"))
"""
# fault -> (module source, what the recorded error says); each plugin declares a backend named like it
FAULTS = {
    "import_raises": ("raise RuntimeError('boom at import')", "failed to load: RuntimeError: boom at import"),
    "import_exits": ("sys.exit(3)", "failed to load: SystemExit: 3"),
    "register_raises": ("@hookimpl\ndef cachedit_register_backends(registry):\n    raise ValueError('cannot declare')",
                        "raised in cachedit_register_backends: ValueError: cannot declare"),
    "register_exits": ("@hookimpl\ndef cachedit_register_backends(registry):\n    sys.exit('bye')",
                       "raised in cachedit_register_backends: SystemExit: bye"),
    "priority_string": ("@hookimpl\ndef cachedit_register_backends(registry):\n    registry.add(Backend("
                        "name='priority_string', device_type='cpu', dist_backend='gloo', priority='high'))",
                        "Backend.priority='high' is invalid; allowed values: an int"),
    "add_not_backend": ("@hookimpl\ndef cachedit_register_backends(registry):\n    registry.add('cpu')",
                        "registry.add expects a cachedit.Backend, got str"),
    "returns_backend": ("@hookimpl\ndef cachedit_register_backends(registry):\n    return Backend(name='x', "
                        "device_type='cpu', dist_backend='gloo')", "declare backends with registry.add"),
    "bad_signature": ("@hookimpl\ndef cachedit_register_backends(registry, not_an_argument):\n    pass",
                      "not_an_argument"),
    "misspelled_hook": (DECLARE.format(name="misspelled_hook") + "@hookimpl\ndef cachedit_atention_kernels(backend):"
                        "\n    return []", "did you mean 'cachedit_attention_kernels'?"),
}
# is_available faults: the backend is listed as unavailable with the reason, never a crash
PROBES = {
    "probe_raises": ("raise OSError('driver gone')", "availability probe raised OSError: driver gone"),
    "probe_exits": ("sys.exit(1)", "availability probe raised SystemExit: 1"),
    "probe_wrong_type": ("return True", "availability probe answered True; expected (bool, str)"),
}
PROBE_SOURCE = """
def probe():
    {body}

@hookimpl
def cachedit_register_backends(registry):
    registry.add(Backend(name="{name}", device_type="cpu", dist_backend="gloo", priority=1000, is_available=probe))
"""


@pytest.fixture(scope="module")
def faulty_site(tmp_path_factory):
    """Every faulty plugin of the matrix, plus two distributions claiming one entry-point name."""
    modules = {f"plug_{n}": HEADER + src for n, (src, _) in FAULTS.items()}
    modules.update({f"plug_{n}": HEADER + PROBE_SOURCE.format(name=n, body=body) for n, (body, _) in PROBES.items()})
    modules.update({f"plug_dup_{i}": HEADER + DECLARE.format(name=f"dup_{i}") for i in (1, 2)})
    site = tmp_path_factory.mktemp("faulty-site")
    make_distribution(site, "faulty", modules, {n: f"plug_{n}" for n in [*FAULTS, *PROBES]})
    make_distribution(site, "dup-one", {}, {"dup": "plug_dup_1"})
    make_distribution(site, "dup-two", {}, {"dup": "plug_dup_2"})
    return site


@pytest.fixture(scope="module")
def loaded(faulty_site):
    """A manager that loaded the real plugins and every faulty one through entry points."""
    sys.path.insert(0, str(faulty_site))
    try:
        pm = PluginManager()
        with pytest.warns(UserWarning):
            pm.load_entry_points()  # the real plugins and the faulty site's, through importlib.metadata
    finally:
        sys.path.remove(str(faulty_site))
    return pm


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_faulty_plugin_is_recorded_by_name_and_ignored(loaded, fault):
    assert FAULTS[fault][1] in loaded.failed[fault]
    assert fault not in loaded.backends
    record = {r.name: r for r in loaded.records()}[fault]
    assert not record.available and FAULTS[fault][1] in record.error
    cpu_ref = loaded.resolve("cpu_ref")  # everything else keeps working
    assert [k.name for k in loaded.attention_kernels(cpu_ref)] == ["math", "torch_sdpa"]


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_faulty_availability_probe_is_an_unavailable_backend(loaded, probe):
    record = {r.name: r for r in loaded.records()}[probe]
    assert not record.available and PROBES[probe][1] in record.reason
    assert loaded.resolve("auto").name == "cpu_ref"  # priority 1000, but unavailable: skipped
    with pytest.raises(ValueError, match=f"device='{probe}' is installed but unavailable"):
        loaded.resolve(probe)


def test_entry_point_name_claimed_twice_loads_neither(loaded):
    assert "claimed by several plugins (plug_dup_1, plug_dup_2)" in loaded.failed["dup"]
    assert not {"dup_1", "dup_2"} & set(loaded.backends)


# -- faults in the questions asked after loading -------------------------------------------------------------------
def _owner(hook_source: str):
    """A plugin owning backend 'owned' whose one other hook is `hook_source`."""
    namespace = {"cachedit": cachedit, "Communicator": Communicator, "torch": torch}
    register = ("@cachedit.hookimpl\ndef cachedit_register_backends(self, registry):\n"
                "    registry.add(cachedit.Backend(name='owned', device_type='cpu', dist_backend='gloo'))\n")
    exec("class Owner:\n" + textwrap.indent(register + textwrap.dedent(hook_source), "    "), namespace)
    return namespace["Owner"]()


WRONG_ANSWERS = {
    "kernels_str": ("def cachedit_attention_kernels(self, backend):\n    return 'math'",
                    "attention_kernels", "answered cachedit_attention_kernels with a str"),
    "kernel_not_callable": ("def cachedit_attention_kernels(self, backend):\n    return [cachedit.AttentionKernel("
                            "name='k', fn=3)]", "attention_kernels", "kernel 'k': fn=3 is not callable"),
    "kernel_priority": ("def cachedit_attention_kernels(self, backend):\n    return [cachedit.AttentionKernel("
                        "name='k', fn=len, priority='high')]", "attention_kernels", "priority='high' is not an int"),
    "kernels_raise": ("def cachedit_attention_kernels(self, backend):\n    raise KeyError('table')",
                      "attention_kernels", "raised in cachedit_attention_kernels: KeyError"),
    "kernels_exit": ("def cachedit_attention_kernels(self, backend):\n    raise SystemExit(2)",
                     "attention_kernels", "raised in cachedit_attention_kernels: SystemExit: 2"),
    "communicator_str": ("@cachedit.hookimpl(tryfirst=True)\ndef cachedit_communicator(self, backend, group):\n"
                         "    return 'gloo'", "communicator", "answered cachedit_communicator with a str"),
    "quant_dict": ("def cachedit_quantized_linear(self, backend, spec):\n    return {}",
                   "quantized_linear", "expected a cachedit.quant.spec.QuantizedLinearPath"),
    "compile_list": ("def cachedit_compile_options(self, backend, target):\n    return ['inductor']",
                     "compile_options", "expected a dict of torch.compile keyword arguments"),
    "compile_unknown_key": ("def cachedit_compile_options(self, backend, target):\n    return {'turbo': True}",
                            "compile_options", "unknown key(s) ['turbo']"),
}


def _question(pm, which: str, backend):
    from cachedit.config import CompileConfig, CompileTarget
    from cachedit.quant.spec import QuantSpec

    return {"attention_kernels": lambda: pm.attention_kernels(backend),
            "communicator": lambda: pm.communicator(backend),
            "quantized_linear": lambda: pm.quantized_linear(backend, QuantSpec("int8", "row")),
            "compile_options": lambda: pm.compile_options(
                backend, CompileTarget("transformer_block", "flux", CompileConfig()))}[which]()


@pytest.mark.parametrize("case", sorted(WRONG_ANSWERS))
def test_wrong_answer_of_the_owner_names_it_and_leaves_others_working(fresh_plugins, case):
    source, question, message = WRONG_ANSWERS[case]
    if not source.startswith("@"):
        source = "@cachedit.hookimpl\n" + source
    fresh_plugins.register(_owner(source), "owner")
    owned = fresh_plugins.backends["owned"]
    with pytest.warns(UserWarning, match="cachedit plugin 'owner' is ignored"), \
            pytest.raises(PluginError, match=f"backend 'owned' is unusable: plugin 'owner' .*{re.escape(message)}"):
        _question(fresh_plugins, question, owned)
    assert message in fresh_plugins.failed["owner"] and "owned" not in fresh_plugins.backends
    assert "owner" in {r.name for r in cachedit.backends()}  # listed with its error, no crash
    with pytest.raises(ValueError, match="device='owned' is not an installed backend.*failed plugins: owner"):
        fresh_plugins.resolve("owned")
    cpu_ref = fresh_plugins.resolve("cpu_ref")  # routed away from 'owner' all along: unaffected
    assert [k.name for k in fresh_plugins.attention_kernels(cpu_ref)] == ["math", "torch_sdpa"]
    assert type(fresh_plugins.communicator(cpu_ref)).__name__ == "GlooCommunicator"


def test_wrong_answer_of_an_extension_is_ignored(fresh_plugins):
    class Garbage:  # declares no backend, so it is asked about every backend
        @cachedit.hookimpl(tryfirst=True)
        def cachedit_communicator(self, backend, group):
            return "not a communicator"

    fresh_plugins.register(Garbage(), "garbage")
    with pytest.warns(UserWarning, match="plugin 'garbage' is ignored: answered cachedit_communicator with a str"):
        comm = fresh_plugins.communicator(fresh_plugins.backends["cpu_ref"])
    assert type(comm).__name__ == "GlooCommunicator" and "garbage" in fresh_plugins.failed


def test_accelerate_with_a_faulty_backend_leaves_the_pipeline_untouched(fresh_plugins):
    fresh_plugins.register(_owner("@cachedit.hookimpl\ndef cachedit_attention_kernels(self, backend):\n"
                                  "    return 'math'"), "owner")
    pipe = tiny_pipeline("flux")
    before = pipe("a cat", **tiny_call_kwargs("flux", num_inference_steps=2)).images
    with pytest.warns(UserWarning), pytest.raises(PluginError, match="plugin 'owner' answered"):
        cachedit.accelerate(pipe, device="owned")
    assert not cachedit.is_accelerated(pipe)
    assert torch.equal(pipe("a cat", **tiny_call_kwargs("flux", num_inference_steps=2)).images, before)
    cachedit.accelerate(pipe, device="cpu_ref")  # the other backends keep working
    assert cachedit.summary(pipe)["backend"] == "cpu_ref"
    cachedit.disable(pipe)


def test_keyboard_interrupt_is_not_contained(fresh_plugins):
    """Ctrl-C must still stop the program, even inside a plugin."""
    class Interrupted:
        @cachedit.hookimpl
        def cachedit_attention_kernels(self, backend):
            raise KeyboardInterrupt

    fresh_plugins.register(Interrupted(), "interrupted")
    with pytest.raises(KeyboardInterrupt):
        fresh_plugins.attention_kernels(fresh_plugins.backends["cpu_ref"])


def test_strict_mode_makes_a_fault_fatal(fresh_plugins, monkeypatch):
    monkeypatch.setenv("CACHEDIT_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="plugin 'owner' raised in cachedit_register_backends"):
        fresh_plugins.register(_owner("@cachedit.hookimpl\ndef cachedit_register_backends(self, registry):\n"
                                      "    raise ValueError('no')"), "owner")


def test_cli_lists_every_fault_and_exits_zero(faulty_site):
    proc = subprocess.run([sys.executable, "-m", "cachedit", "backends", "--json"], capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(faulty_site)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    for name, (_, message) in FAULTS.items():
        assert message in rows[name]["error"], name
    for name, (_, message) in PROBES.items():
        assert message in rows[name]["reason"], name
    assert rows["cpu_ref"]["available"] and "claimed by several plugins" in rows["dup"]["error"]
