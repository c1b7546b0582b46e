"""The ascend plugin without an NPU: probes with torch_npu missing / failing / without NPU / present, the
npu_fused_infer_attention_score kernel and the INT8 paths through a fake torch_npu that checks every call against
torch_npu 2.13.0's documentation and computes the documented result in float64, compile options, and
that neither plugin imports its vendor library at import time.

Nothing here ran on an Ascend NPU.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import subprocess
import sys

import pytest
import torch
from cachedit_ascend import plugin as ascend_plugin
from cachedit_ascend import quant as ascend_quant
from cachedit_cpu_ref.quant import EmulatedLinearPath
from cachedit_cpu_ref.quant import quantize as ref_quantize

from cachedit.attention import select_kernel
from cachedit.config import CompileConfig, CompileTarget
from cachedit.parallel.communicator import Communicator
from cachedit.plugins import manager
from cachedit.quant.spec import QuantSpec
from cachedit.testing.conformance import ATTENTION_ATOL, reference_attention

from fake_torch_npu import FailingImport, VendorError, make_torch_npu
from tests.fakes.reference import max_err, random_qkv, route_forward


@pytest.fixture
def backend():
    return manager().backends["ascend"]


@pytest.fixture
def npu(monkeypatch):
    """npu(**make_torch_npu kwargs) installs a fake torch_npu; npu(None) makes `import torch_npu` fail as
    not installed."""

    def install(**kwargs):
        fake = make_torch_npu(**kwargs)
        monkeypatch.setitem(sys.modules, "torch_npu", fake)
        return fake

    return install


# -- availability ------------------------------------------------------------------------------------------------
def test_probe_torch_npu_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    ok, reason = ascend_plugin.probe()
    assert not ok and "torch_npu is not installed" in reason


def test_probe_torch_npu_import_failing(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.setattr(sys, "meta_path", [FailingImport()] + sys.meta_path)
    ok, reason = ascend_plugin.probe()
    assert not ok and "import torch_npu failed: ImportError: libhccl.so" in reason and "CANN" in reason


def test_probe_no_npu_names_the_visible_devices_variable(npu, monkeypatch):
    npu(available=False)
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES", raising=False)
    ok, reason = ascend_plugin.probe()
    assert not ok and "ASCEND_RT_VISIBLE_DEVICES=<unset>" in reason
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "")
    assert "ASCEND_RT_VISIBLE_DEVICES=''" in ascend_plugin.probe()[1]


def test_probe_present(npu, backend):
    npu(devices=2)
    assert ascend_plugin.probe() == (True, "") and backend.probe() == (True, "")


def test_hooks_answer_nothing_when_unavailable(monkeypatch, backend):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    assert ascend_plugin.cachedit_attention_kernels(backend) is None
    assert ascend_plugin.cachedit_quantized_linear(backend, QuantSpec("int8", "row")) is None


# -- the fused attention kernel -----------------------------------------------------------------------------------
def _kernel(backend):
    kernels = ascend_plugin.cachedit_attention_kernels(backend)
    assert [k.name for k in kernels] == ["npu_fused_infer_attention_score"]
    return kernels[0]


def test_kernel_declaration_and_selection(npu, backend):
    npu()
    kernel = _kernel(backend)
    assert kernel.dtypes == {torch.float16, torch.bfloat16} and kernel.head_dims == (16, 512)
    assert kernel.returns_lse and kernel.supports_mask and kernel.supports_causal and kernel.supports_gqa
    pool = manager().attention_kernels(backend)
    name = "npu_fused_infer_attention_score"
    assert select_kernel(pool, None, torch.bfloat16, 128, mask=True, need_lse=True).name == name
    assert select_kernel(pool, None, torch.bfloat16, 1024).name == "torch_sdpa"
    assert select_kernel(pool, None, torch.float32, 128).name == "torch_sdpa"  # FIA takes no float32
    with pytest.raises(ValueError, match="cannot serve this model: head_dim 1024"):
        select_kernel(pool, name, torch.bfloat16, 1024)
    npu(device_name="Ascend310P3")
    assert ascend_plugin.cachedit_attention_kernels(backend) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_infer_attention_matches_float64_reference(npu, backend, dtype):
    fake = npu()
    fn, tol = _kernel(backend).fn, ATTENTION_ATOL[dtype]
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(2, 1, 37, 29, generator=g) > 0.3
    keep[..., 0] = True
    cases = [
        ({}, {}),
        ({"kv_heads": 2}, {}),  # GQA
        ({}, {"attn_mask": keep}),  # B1SS
        ({}, {"attn_mask": keep[:1, 0]}),  # SS
        ({}, {"attn_mask": keep[:, :, :1]}),  # a key mask that is not a prefix: B1SS
        ({}, {"attn_mask": keep[:, :, :1].expand(2, 4, 1, 29)}),  # per head, diffusers' (B, N, 1, Sk)
        ({}, {"attn_mask": torch.zeros(keep.shape).masked_fill(~keep, -1e4).to(dtype)}),  # additive -> pse
        ({}, {"attn_mask": torch.randn(2, 1, 37, 29, generator=g).to(dtype)}),  # a real bias: pse / scale
        ({"sq": 29}, {"is_causal": True}),  # sparse_mode 3, compressed mask
        ({"sq": 13}, {"is_causal": True}),  # Sq < Sk: sparse_mode 3 is bottom-right
        ({"sq": 29, "sk": 13}, {"is_causal": True}),  # Sq > Sk: explicit mask, empty rows
        ({"sq": 29}, {"is_causal": True, "attn_mask": keep[:, :, :29, :29]}),
    ]
    for shape, kw in cases:
        q, k, v = random_qkv(dtype, **shape)
        out = fn(q, k, v, **kw)
        ref = reference_attention(q, k, v, **kw)[0].nan_to_num(0.0)
        assert out.shape == q.shape and out.dtype == dtype
        assert max_err(out, ref) <= tol, (shape, {n: getattr(t, "shape", t) for n, t in kw.items()})
    layouts = {c.get("layout") for c in fake.calls}
    assert layouts == {"BNSD"} and all(isinstance(c["scale"], float) for c in fake.calls)
    modes = [c["sparse_mode"] for c in fake.calls]
    assert modes[-4:] == [3, 3, 0, 0] and fake.calls[-2]["inner_precise"] == 2
    assert fake.calls[3]["mask"] == (37, 29) and fake.calls[4]["mask"] == (2, 1, 37, 29)
    assert fake.calls[5]["pse"] == fake.calls[6]["pse"] == (2, 4, 37, 29)  # per-head and float: pse, B·N·S·S


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_infer_attention_lse(npu, backend, dtype):
    npu()
    fn = _kernel(backend).fn
    for kv_heads, causal, sq in ((4, False, 37), (2, False, 37), (4, True, 29)):
        q, k, v = random_qkv(dtype, kv_heads=kv_heads, sq=sq)
        out, lse = fn(q, k, v, scale=0.1, is_causal=causal, return_lse=True)
        ref, ref_lse = reference_attention(q, k, v, scale=0.1, is_causal=causal)
        assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32
        assert max_err(lse, ref_lse) <= max(10 * ATTENTION_ATOL[dtype], 2e-6)
        assert max_err(out, ref) <= ATTENTION_ATOL[dtype]


def test_fake_npu_rejects_what_the_docs_reject(npu):
    fake = npu()
    q, k, v = random_qkv(torch.float16)
    with pytest.raises(VendorError, match="head_num"):
        fake.npu_fusion_attention(q, k, v, 8, "BNSD", scale=0.125)
    with pytest.raises(VendorError, match="input_layout"):
        fake.npu_fusion_attention(q, k, v, 4, "BHSD", scale=0.125)
    with pytest.raises(VendorError, match="SS, 11SS, B1SS or BNSS"):
        fake.npu_fusion_attention(q, k, v, 4, "BNSD", scale=0.125,
                                  atten_mask=torch.zeros(2, 1, 1, 29, dtype=torch.bool))
    with pytest.raises(VendorError, match="same dtype"):
        fake.npu_fusion_attention(q, k.float(), v, 4, "BNSD", scale=0.125)
    with pytest.raises(TypeError):
        fake.npu_fusion_attention(q, k, v, 4, "BNSD", pre_tokens=10)  # v1 spells it pre_tockens
    with pytest.raises(VendorError, match="float16 or bfloat16"):
        fake.npu_dynamic_quant(torch.randn(4, 8))
    x1, x2 = torch.zeros(4, 32, dtype=torch.int8), torch.zeros(32, 16, dtype=torch.int8)
    with pytest.raises(VendorError, match="int8 output"):
        fake.npu_quant_matmul(x1, x2, torch.ones(16))
    with pytest.raises(VendorError, match="float16 when pertoken not given"):
        fake.npu_quant_matmul(x1, x2, torch.ones(16), bias=torch.zeros(16, dtype=torch.float16),
                              output_dtype=torch.bfloat16)


# -- INT8 linears ---------------------------------------------------------------------------------------------------
def _linear_case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 64, generator=g)
    w[3] *= 20
    return torch.randn(2, 20, 64, generator=g).to(dtype), w.to(dtype), torch.randn(48, generator=g).to(dtype)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_w8a8_quant_matmul_matches_cpu_ref_emulation(npu, backend, granularity, dtype):
    fake = npu()
    spec = QuantSpec("int8", granularity)
    path = ascend_plugin.cachedit_quantized_linear(backend, spec)
    assert isinstance(path, ascend_quant.QuantMatmulW8A8Path)
    x, w, b = _linear_case(dtype)
    qw, scale = path.quantize_weight(w)
    rq, rs = ref_quantize(w, "int8", granularity)
    assert torch.equal(qw, rq) and torch.equal(scale, rs)
    y = path.linear(x, qw, scale, b)
    ref = EmulatedLinearPath(spec).linear(x, rq, rs, b)
    assert y.shape == ref.shape and y.dtype == dtype
    rel = ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    # output rounding to bfloat16 / float16 (float32 inputs are computed in bfloat16, so their int8 codes may
    # also differ by one step from the float32 emulation)
    assert rel <= {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float32: 2 ** -6}[dtype], rel
    mm = [c for c in fake.calls if c["op"] == "npu_quant_matmul"][-1]
    assert mm["x2_transposed"] and mm["pertoken"] and mm["bias"] == torch.float32
    assert mm["scale"] == ((48,) if granularity == "row" else (1,))
    assert any(c["op"] == "npu_dynamic_quant" for c in fake.calls) == (granularity == "row")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_weight_only_int8_matches_cpu_ref_emulation(npu, backend, dtype):
    fake = npu()
    spec = QuantSpec("int8", "row", weight_only=True)
    path = ascend_plugin.cachedit_quantized_linear(backend, spec)
    assert isinstance(path, ascend_quant.WeightQuantMatmulPath)
    x, w, b = _linear_case(dtype)
    qw, scale = path.quantize_weight(w)
    y = path.linear(x, qw, scale, b)
    ref = EmulatedLinearPath(spec).linear(x, *ref_quantize(w, "int8", "row"), b)
    rel = ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    assert y.dtype == dtype and rel <= 2 ** -6, rel  # the scale is handed over in the activation dtype
    assert fake.calls[-1]["op"] == "npu_weight_quant_batchmatmul"


def test_quant_paths_served_and_refused(npu, backend):
    npu()
    assert ascend_plugin.cachedit_quantized_linear(backend, QuantSpec("fp8", "row")) is None
    fake = npu(device_name="Ascend310P3")
    assert ascend_plugin.cachedit_quantized_linear(backend, QuantSpec("int8", "row")) is None
    assert "Atlas inference cards" in ascend_quant.unsupported(QuantSpec("int8", "row"), fake, "Ascend310P3")
    fake = npu()
    del fake.npu_dynamic_quant
    assert "no npu_dynamic_quant" in ascend_quant.unsupported(QuantSpec("int8", "row"), fake, "Ascend910B3")
    with pytest.raises(ValueError, match="at most 65535"):
        ascend_quant.QuantMatmulW8A8Path(QuantSpec("int8", "row"), fake).quantize_weight(torch.zeros(8, 70000))


# -- communicator and compile options ----------------------------------------------------------------------------------
def test_hccl_communicator_is_the_core_one(backend):
    comm = ascend_plugin.cachedit_communicator(backend, None)
    assert type(comm) is Communicator and backend.dist_backend == "hccl"


@pytest.mark.parametrize("registered,mode,expected", [
    ({"npu", "npugraph_ex"}, None, "npu"),
    ({"npu", "npugraph_ex"}, "reduce-overhead", "npugraph_ex"),
    ({"npu"}, "reduce-overhead", "npu"),
    (set(), None, None),
])
def test_compile_options_pick_torch_npus_dynamo_backend(monkeypatch, backend, registered, mode, expected):
    monkeypatch.setattr(ascend_plugin, "_dynamo_backends", lambda: set(registered))
    opts = manager().compile_options(backend, CompileTarget("transformer_block", "flux", CompileConfig(mode=mode)))
    assert opts.pop("fuse_qkv") is True  # the core's key, popped before torch.compile
    assert set(opts) <= set(inspect.signature(torch.compile).parameters) - {"model"}
    assert opts.get("backend") == expected and opts["dynamic"] is False
    assert not ("mode" in opts and "options" in opts)


def test_torch_npus_registered_backend_names_are_read_from_entry_points():
    try:
        importlib.metadata.version("torch_npu")
        pytest.skip("torch_npu is installed here")
    except importlib.metadata.PackageNotFoundError:
        pass
    # torch_npu not installed: its "npu" / "npugraph_ex" torch_dynamo_backends entry points are absent
    assert "npu" not in ascend_plugin._dynamo_backends()
    assert ascend_plugin.compile_backend(None)[0] is None


# -- both plugins load cleanly; the CLI still lists them unavailable with reasons ------------------------------------
def test_plugins_import_no_vendor_library_and_cli_lists_reasons():
    code = (
        "import runpy, sys\n"
        "import cachedit_cuda.plugin, cachedit_ascend.plugin\n"
        "sys.argv = ['cachedit', 'backends']\n"
        "try:\n    runpy.run_module('cachedit', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print('VENDOR', [m for m in ('torch_npu', 'flash_attn_interface', 'torchair') if m in sys.modules])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "VENDOR []"
    rows = {line.split()[0]: line for line in lines[2:-1]}
    if not torch.cuda.is_available():
        assert rows["cuda"].split()[2] == "no" and "CUDA" in rows["cuda"]
    assert rows["ascend"].split()[2] == "no" and "torch_npu" in rows["ascend"]
    assert rows["cpu_ref"].split()[2] == "yes"


def test_router_runs_a_real_dit_through_npu_fused_infer_attention_score(npu, monkeypatch, backend):
    """The tiny FLUX pipeline (bfloat16) with its transformer's SDPA calls routed by the core's AttentionRouter to
    npu_fused_infer_attention_score (fake torch_npu), against the same pipeline on torch's CPU SDPA."""
    from cachedit.attention import AttentionRouter
    from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

    fake = npu()
    pipe = tiny_pipeline("flux", dtype=torch.bfloat16)
    before = pipe("a photo of a cat", **dict(tiny_call_kwargs("flux"), num_inference_steps=2)).images
    router = AttentionRouter(manager().attention_kernels(backend))
    route_forward(monkeypatch, pipe.transformer, router)
    during = pipe("a photo of a cat", **dict(tiny_call_kwargs("flux"), num_inference_steps=2)).images
    assert set(router.calls) == {"npu_fused_infer_attention_score"} and fake.calls
    assert (during.double() - before.double()).abs().max().item() < 2e-2  # bfloat16 kernels, two orders


# -- hardware readiness: graph mode, pse/scale readings, compact masks, empty rows, device gate ---------------------
def _offered(backend):
    kernels = ascend_plugin.cachedit_attention_kernels(backend)
    assert len(kernels) == 1
    return kernels[0]


def _keep(seed=1):
    keep = torch.rand(2, 1, 37, 29, generator=torch.Generator().manual_seed(seed)) > 0.3
    keep[..., 0] = True
    return keep


@pytest.mark.parametrize("pse_before_scale", [True, False], ids=["pse-before-scale", "pse-after-scale"])
@pytest.mark.parametrize("graph_mode", [False, True], ids=["eager", "graph"])
def test_float_masks_hold_under_graph_mode_and_either_pse_reading(npu, backend, graph_mode, pse_before_scale):
    """A float mask reaches the op under the NPU graph backend (torchair's npu_fusion_attention converter drops
    it) and means the same whether the op adds pse before or after the scale (the docs say both)."""
    fake = npu(graph_mode=graph_mode, pse_before_scale=pse_before_scale)
    fn = _offered(backend).fn
    q, k, v = random_qkv(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    for mask in (torch.randn(2, 1, 37, 29, generator=g).bfloat16(), torch.randn(1, 1, 1, 29, generator=g).bfloat16()):
        for scale in (None, 0.1):
            out, lse = fn(q, k, v, attn_mask=mask, scale=scale, return_lse=True)
            ref, ref_lse = reference_attention(q, k, v, attn_mask=mask, scale=scale)
            assert max_err(out, ref) <= ATTENTION_ATOL[torch.bfloat16]
            assert max_err(lse, ref_lse) <= 10 * ATTENTION_ATOL[torch.bfloat16]
    assert not any(c["dropped"] for c in fake.calls)


def test_masks_reach_the_op_in_their_compact_forms(npu, backend):
    """No B·N·S·S pse and no B·1·S·S mask where the op takes less: a key-padding mask becomes per-batch key
    lengths, a shared mask stays (Sq, Sk), a bias shared by the batch stays batch 1."""
    fake = npu()
    fn = _offered(backend).fn
    q, k, v = random_qkv(torch.float16)
    keep = _keep()
    padding = torch.ones(2, 1, 1, 29, dtype=torch.bool)
    padding[0, ..., 20:] = False
    cases = [(padding, dict(mask=None, kv_lens=[20, 29], pse=None)),
             (keep[:1, :1], dict(mask=(37, 29), pse=None)),
             (torch.randn(1, 1, 37, 29).half(), dict(mask=None, pse=(1, 4, 37, 29)))]
    for mask, want in cases:
        out = fn(q, k, v, attn_mask=mask)
        assert max_err(out, reference_attention(q, k, v, attn_mask=mask)[0]) <= ATTENTION_ATOL[torch.float16]
        call = fake.calls[-1]
        assert {key: call.get(key) for key in want} == want, call


def test_rows_with_no_kept_key_give_zero_and_lse_minus_inf(npu, backend):
    """Row-invalid correction (inner_precise=2) whenever a mask is given; cachedit's output 0 / LSE -inf on such
    rows whatever the op reports there."""
    fake = npu()
    fn = _offered(backend).fn
    q, k, v = random_qkv(torch.float16)
    keep = _keep()
    keep[:, :, :5] = False
    ref, ref_lse = reference_attention(q, k, v, attn_mask=keep)
    out, lse = fn(q, k, v, attn_mask=keep, return_lse=True)
    assert fake.calls[-1]["inner_precise"] == 2
    assert (out[:, :, :5] == 0).all() and torch.isneginf(lse[:, :, :5]).all()
    assert max_err(out[:, :, 5:], ref[:, :, 5:]) <= ATTENTION_ATOL[torch.float16]
    assert max_err(lse[:, :, 5:], ref_lse[:, :, 5:]) <= 10 * ATTENTION_ATOL[torch.float16]


@pytest.mark.parametrize("name", ["Ascend910A", "Ascend910ProB", "Ascend310P3", "Ascend310B1", ""])
def test_devices_outside_atlas_a2_a3_get_no_a2_a3_ops(npu, backend, name):
    npu(device_name=name)
    assert ascend_plugin.cachedit_attention_kernels(backend) == []
    assert ascend_plugin.cachedit_quantized_linear(backend, QuantSpec("int8", "row")) is None


@pytest.mark.parametrize("name", ["Ascend910B3", "Ascend910B4", "Ascend910_9392"])
def test_atlas_a2_a3_devices_get_the_ops(npu, backend, name):
    npu(device_name=name)
    assert len(ascend_plugin.cachedit_attention_kernels(backend)) == 1
    assert ascend_plugin.cachedit_quantized_linear(backend, QuantSpec("int8", "row")) is not None
