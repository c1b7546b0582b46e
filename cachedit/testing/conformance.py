"""The backend conformance suite, parametrized over every installed backend.

    pytest --pyargs cachedit.testing.conformance [--cachedit-backend NAME]
    python -m cachedit conformance [--backend NAME]

Each test states what a backend promises the core: kernels agree with float64 reference
attention (and their log-sum-exp with the true one), communicators' collectives give the
exact results, quantized linears stay within the scheme's error bound, compile options are
valid torch.compile arguments, and accelerate/disable round-trips a real pipeline bit for bit.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from cachedit.plugins import manager

# Max abs error allowed against the float64 reference, per input dtype (inputs ~ N(0, 1)).
ATTENTION_ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def reference_attention(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """float64 softmax attention and its log-sum-exp, (batch, heads, seq, dim) layout."""
    q, k, v = q.double(), k.double(), v.double()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if is_causal:
        lq, lk = s.shape[-2:]
        s = s.masked_fill(~torch.ones(lq, lk, dtype=torch.bool, device=s.device).tril(lk - lq), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.double()
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v, lse


def _device(backend) -> torch.device:
    return torch.device(backend.device_type)


def _kernels(backend):
    kernels = manager().attention_kernels(backend)
    assert kernels, f"backend {backend.name!r} offers no attention kernel (not even the core's fallback)"
    return kernels


def _cases(kernel, head_dim=64):
    for dtype in sorted(kernel.dtypes, key=str):
        if dtype in ATTENTION_ATOL and not kernel.unsupported(dtype, head_dim):
            yield dtype


def _qkv(dtype, device, sq=37, sk=29, heads=4, kv_heads=4, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda s, h: torch.randn(2, h, s, dim, generator=g, dtype=torch.float64).to(device, dtype)  # noqa: E731
    return make(sq, heads), make(sk, kv_heads), make(sk, kv_heads)


def test_backend_declaration(cachedit_backend):
    b = cachedit_backend
    assert b.name and b.plugin, "a backend must have a name and know its plugin"
    torch.device(b.device_type)  # a torch device type torch knows
    assert isinstance(b.dist_backend, str) and b.dist_backend
    ok, reason = b.probe()
    assert ok and reason == ""


def test_attention_matches_reference(cachedit_backend):
    for kernel in _kernels(cachedit_backend):
        for dtype in _cases(kernel):
            q, k, v = _qkv(dtype, _device(cachedit_backend))
            out = kernel.fn(q, k, v)
            ref, _ = reference_attention(q, k, v)
            assert out.dtype == dtype and out.shape == q.shape, kernel.name
            err = (out.double().cpu() - ref.cpu()).abs().max().item()
            assert err <= ATTENTION_ATOL[dtype], f"{kernel.name} {dtype}: max abs err {err}"


def test_attention_masks_causal_gqa(cachedit_backend):
    device = _device(cachedit_backend)
    for kernel in _kernels(cachedit_backend):
        for dtype in _cases(kernel):
            if kernel.supports_mask:
                q, k, v = _qkv(dtype, device)
                keep = torch.rand(2, 1, 37, 29, generator=torch.Generator().manual_seed(1)) > 0.3
                keep[..., 0] = True
                for mask in (keep.to(device), torch.zeros(keep.shape).masked_fill(~keep, -1e4).to(device, dtype)):
                    err = (kernel.fn(q, k, v, attn_mask=mask).double().cpu()
                           - reference_attention(q, k, v, attn_mask=mask)[0].cpu()).abs().max().item()
                    assert err <= ATTENTION_ATOL[dtype], f"{kernel.name} {dtype} mask {mask.dtype}: {err}"
            if kernel.supports_causal:
                q, k, v = _qkv(dtype, device, sq=29)
                err = (kernel.fn(q, k, v, is_causal=True).double().cpu()
                       - reference_attention(q, k, v, is_causal=True)[0].cpu()).abs().max().item()
                assert err <= ATTENTION_ATOL[dtype], f"{kernel.name} {dtype} causal: {err}"
            if kernel.supports_gqa:
                q, k, v = _qkv(dtype, device, kv_heads=2)
                err = (kernel.fn(q, k, v).double().cpu() - reference_attention(q, k, v)[0].cpu()).abs().max().item()
                assert err <= ATTENTION_ATOL[dtype], f"{kernel.name} {dtype} gqa: {err}"


def test_attention_lse(cachedit_backend):
    lse_kernels = [k for k in _kernels(cachedit_backend) if k.returns_lse]
    if not lse_kernels:
        pytest.skip("no kernel of this backend declares returns_lse")
    for kernel in lse_kernels:
        for dtype in _cases(kernel):
            q, k, v = _qkv(dtype, _device(cachedit_backend))
            out, lse = kernel.fn(q, k, v, scale=0.1, return_lse=True)
            ref, ref_lse = reference_attention(q, k, v, scale=0.1)
            assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32, kernel.name
            # the LSE is float32 by contract, whatever the input dtype
            assert (lse.double().cpu() - ref_lse.cpu()).abs().max().item() <= max(10 * ATTENTION_ATOL[dtype], 2e-6)
            assert (out.double().cpu() - ref.cpu()).abs().max().item() <= ATTENTION_ATOL[dtype]


def test_attention_rows_with_no_kept_key(cachedit_backend):
    """A row whose mask keeps no key (Ring attention over padding keys, uneven shards) gives output 0 and, from
    kernels returning the LSE, LSE -inf: a finite LSE there would weigh a zero block into the Ring merge."""
    device = _device(cachedit_backend)
    for kernel in _kernels(cachedit_backend):
        if not kernel.supports_mask:
            continue
        for dtype in _cases(kernel):
            q, k, v = _qkv(dtype, device)
            keep = torch.rand(2, 1, 37, 29, generator=torch.Generator().manual_seed(1)) > 0.3
            keep[..., 0] = True
            keep[:, :, :5] = False
            ref = reference_attention(q, k, v, attn_mask=keep.to(device))[0].cpu()
            for mask in (keep.to(device), torch.zeros(keep.shape).masked_fill(~keep, float("-inf")).to(device, dtype)):
                result = kernel.fn(q, k, v, attn_mask=mask, return_lse=kernel.returns_lse)
                out = (result[0] if kernel.returns_lse else result).double().cpu()
                assert (out[:, :, :5] == 0).all(), f"{kernel.name} {dtype} {mask.dtype}: rows with no key must be 0"
                err = (out[:, :, 5:] - ref[:, :, 5:]).abs().max().item()
                assert err <= ATTENTION_ATOL[dtype], f"{kernel.name} {dtype} {mask.dtype}: {err}"
                if kernel.returns_lse:
                    assert torch.isneginf(result[1][:, :, :5].cpu()).all(), f"{kernel.name}: LSE must be -inf there"


def test_attention_declarations_are_enforced(cachedit_backend):
    for kernel in _kernels(cachedit_backend):
        assert kernel.unsupported(torch.int32, 64), f"{kernel.name} claims to serve int32 attention"
        assert kernel.unsupported(torch.float32, kernel.head_dims[1] + 1), f"{kernel.name} head_dim bound"
        if not kernel.returns_lse:
            assert kernel.unsupported(sorted(kernel.dtypes, key=str)[0], kernel.head_dims[0], need_lse=True)


def _collectives_on_rank(rank, world, backend_name):
    from cachedit.plugins import manager as m

    backend = m().backends[backend_name]
    comm = m().communicator(backend, None)
    dev = torch.device(backend.device_type, rank) if backend.device_type != "cpu" else torch.device("cpu")
    x = torch.arange(24, dtype=torch.float32, device=dev).reshape(4, 6) + 100 * rank
    out = {
        "rank": comm.rank, "world": comm.world_size,
        "sum": comm.all_reduce(x), "max": comm.all_reduce(x, "max"), "avg": comm.all_reduce(x, "avg"),
        "gather": comm.all_gather(x, dim=1),
        "gather_uneven": comm.all_gather_uneven(x[: rank + 1], dim=0),
        "reduce_scatter": comm.reduce_scatter(x, dim=0),
        "a2a": comm.all_to_all(x, scatter_dim=0, gather_dim=1),
        "ring": comm.send_recv_ring(x),
        "bcast": comm.broadcast(x, src=world - 1),
        "a2a_fp8": comm.all_to_all(x.to(torch.float8_e4m3fn), scatter_dim=0, gather_dim=1).float(),
    }
    # Uneven exchanges (context parallelism with lengths or head counts the world does not divide).
    sizes = list(range(1, world + 1))
    y = torch.arange(sum(sizes) * (rank + 1), dtype=torch.float32, device=dev).reshape(sum(sizes), rank + 1) + 1000 * rank
    out["a2a_uneven"] = comm.all_to_all_uneven(y, 0, 1, sizes, sizes)
    out["a2a_uneven_async"] = comm.all_to_all_uneven(y, 0, 1, sizes, sizes, async_op=True).wait()
    prev = (rank - 1) % world
    out["ring_uneven"] = comm.send_recv_ring(x[: rank + 1], recv_shape=(prev + 1, 6))
    out["ring_async"] = comm.send_recv_ring(x, async_op=True).wait()
    return {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in out.items()}


@pytest.mark.parametrize("world", [2, 4])
def test_communicator_collectives(cachedit_backend, world):
    from cachedit.testing.distributed import run_distributed

    if cachedit_backend.device_type != "cpu":
        count = getattr(torch, cachedit_backend.device_type).device_count()
        if count < world:
            pytest.skip(f"needs {world} {cachedit_backend.device_type} devices, {count} visible")
    res = run_distributed(_collectives_on_rank, world, cachedit_backend, args=(cachedit_backend.name,))
    xs = [torch.arange(24, dtype=torch.float32).reshape(4, 6) + 100 * r for r in range(world)]
    total = sum(xs)
    for r, got in enumerate(res):
        assert (got["rank"], got["world"]) == (r, world)
        assert torch.equal(got["sum"], total)
        assert torch.equal(got["max"], xs[-1])
        torch.testing.assert_close(got["avg"], total / world)
        assert torch.equal(got["gather"], torch.cat(xs, dim=1))
        assert torch.equal(got["gather_uneven"], torch.cat([x[: i + 1] for i, x in enumerate(xs)], dim=0))
        assert torch.equal(got["reduce_scatter"], total.chunk(world, 0)[r])
        assert torch.equal(got["a2a"], torch.cat([x.chunk(world, 0)[r] for x in xs], dim=1))
        assert torch.equal(got["ring"], xs[(r - 1) % world])
        assert torch.equal(got["bcast"], xs[-1])
        fp8 = [x.to(torch.float8_e4m3fn).float() for x in xs]
        assert torch.equal(got["a2a_fp8"], torch.cat([x.chunk(world, 0)[r] for x in fp8], dim=1))
        sizes = list(range(1, world + 1))
        ys = [torch.arange(sum(sizes) * (j + 1), dtype=torch.float32).reshape(sum(sizes), j + 1) + 1000 * j
              for j in range(world)]
        want = torch.cat([y.split(sizes, 0)[r] for y in ys], dim=1)
        assert torch.equal(got["a2a_uneven"], want) and torch.equal(got["a2a_uneven_async"], want)
        assert torch.equal(got["ring_uneven"], xs[(r - 1) % world][: (r - 1) % world + 1])
        assert torch.equal(got["ring_async"], xs[(r - 1) % world])


# Max relative Frobenius error of a quantized linear against float64, per scheme/granularity.
QUANT_RTOL = {("fp8", "tensor"): 0.08, ("fp8", "row"): 0.06, ("int8", "tensor"): 0.03, ("int8", "row"): 0.02}


@pytest.mark.parametrize("scheme,granularity,weight_only", [
    ("fp8", "tensor", False), ("fp8", "row", False), ("int8", "tensor", False), ("int8", "row", False),
    ("int8", "row", True),
])
def test_quantized_linear(cachedit_backend, scheme, granularity, weight_only):
    from cachedit.quant.spec import QuantSpec

    path = manager().quantized_linear(cachedit_backend, QuantSpec(scheme, granularity, weight_only))
    if path is None:
        pytest.skip(f"backend {cachedit_backend.name!r} has no {scheme}/{granularity} path")
    g = torch.Generator().manual_seed(0)
    dev = _device(cachedit_backend)
    w = torch.randn(48, 64, generator=g)
    w[3] *= 20  # an outlier channel: row granularity must not suffer from it
    x, b = torch.randn(2, 5, 64, generator=g), torch.randn(48, generator=g)
    qw, w_scale = path.quantize_weight(w.to(dev))
    assert qw.shape == w.shape and qw.element_size() == 1, "weights must be stored in one byte"
    assert w_scale.numel() in (1, 48)
    y = path.linear(x.to(dev), qw, w_scale, b.to(dev))
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    assert y.shape == ref.shape and y.dtype == torch.float32
    rel = ((y.double().cpu() - ref).norm() / ref.norm()).item()
    assert rel <= QUANT_RTOL[(scheme, granularity)], f"relative error {rel:.4f}"


def test_compile_options(cachedit_backend):
    from cachedit.config import CompileConfig, CompileTarget

    opts = manager().compile_options(cachedit_backend, CompileTarget("transformer_block", "flux", CompileConfig()))
    allowed = set(inspect.signature(torch.compile).parameters) - {"model"}
    assert isinstance(opts.pop("fuse_qkv", False), bool), "fuse_qkv (the core's key) must be a bool"
    assert set(opts) <= allowed, f"not torch.compile arguments: {set(opts) - allowed}"
    assert "mode" not in opts or "options" not in opts, "torch.compile takes mode or options, not both"


def test_accelerate_then_disable_is_bitwise(cachedit_backend):
    import cachedit
    from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

    pipe = tiny_pipeline("flux").to(_device(cachedit_backend))
    before = pipe("a photo of a cat", **tiny_call_kwargs("flux")).images
    cachedit.accelerate(pipe, device=cachedit_backend.name)
    during = pipe("a photo of a cat", **tiny_call_kwargs("flux")).images
    attention = cachedit.summary(pipe)["attention"]
    calls = attention["eager_calls"].get("transformer")
    if calls is None:  # no kernel of the backend outranks torch's SDPA: nothing is routed, the model runs as is
        assert attention["kernels"]["transformer"] == ["torch_sdpa"] and torch.equal(during, before)
    else:
        assert sum(calls.values()) > 0, "attention did not go through the backend's kernels"
    cachedit.disable(pipe)
    after = pipe("a photo of a cat", **tiny_call_kwargs("flux")).images
    assert torch.equal(before, after)
    assert (during.double() - before.double()).abs().max().item() < 1e-3
