"""`cachedit doctor`: what this machine's backends can do, checked on the machine itself.

For a user on a new machine (CUDA, Ascend or CPU), and for whoever has hardware nobody here has run:

1. every installed backend, and why it is or is not available;
2. the shipped conformance suite (`cachedit.testing.conformance`) for each available backend;
3. every attention kernel against float64 math: plain, boolean and float masks, rows with no kept
   key (output 0, LSE -inf is cachedit's convention), causal, and the log-sum-exp;
4. every quantized linear path against float64 math (the scheme's bound) and against cpu_ref's
   emulation of the same quantization where cpu_ref is installed;
5. each kernel's time at a FLUX-like shape (a 1024x1024 image is 4096 tokens, 24 heads x 128); on
   a CPU the shape is reduced (and says so) to stay within about two minutes;
6. the questions the vendors' docs leave open, settled where the hardware is present: on an NPU
   whether npu_fused_infer_attention_score adds pse before or after the scale; on a GPU what the
   mem-efficient kernel reports as LSE on a row with no kept key.

It prints one table and writes everything as JSON (`--out`). If you have the hardware, run
`cachedit doctor` and open an issue with its JSON.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

FLUX_SHAPE = (1, 24, 4096, 128)  # batch, heads, tokens of a 1024x1024 FLUX image, head_dim
CPU_SHAPE = (1, 24, 1024, 128)  # a quarter of the tokens: the CPU's math attention stays within seconds
FAST_SHAPE = (1, 2, 128, 64)  # --fast (tests)
QUANT_SPECS = [("fp8", "tensor", False), ("fp8", "row", False), ("int8", "tensor", False), ("int8", "row", False),
               ("int8", "row", True), ("fp8", "row", True)]


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


def _device(backend) -> torch.device:
    return torch.device(backend.device_type)


# -- 1. backends ----------------------------------------------------------------------------------------------------
def backend_report() -> list[dict]:
    from . import backends

    return [{"name": r.name, "plugin": r.plugin, "available": bool(r.available), "device": r.device_type,
             "reason": r.error or r.reason or ""} for r in backends()]


# -- 2. conformance -------------------------------------------------------------------------------------------------
def run_conformance(name: str, fast: bool, timeout: int = 600) -> dict:
    """The conformance suite for one backend, in a child process (it spawns ranks of its own)."""
    cmd = [sys.executable, "-m", "pytest", "--pyargs", "cachedit.testing.conformance", "-q", "-p", "no:cacheprovider",
           f"--cachedit-backend={name}"]
    if fast:
        cmd += ["-k", "declaration or matches_reference"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "summary": f"timed out after {timeout} s"}
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    return {"ok": done.returncode == 0, "summary": lines[-1] if lines else done.stderr.strip()[-300:],
            "subset": "declaration, matches_reference (--fast)" if fast else "all"}


# -- 3. attention kernels against float64 math -----------------------------------------------------------------------
def _attention_cases(device, dtype, kernel, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda s, h: torch.randn(2, h, s, 64, generator=g, dtype=torch.float64).to(device, dtype)  # noqa: E731
    q, k, v = make(37, 4), make(29, 4), make(29, 4)
    keep = torch.rand(2, 1, 37, 29, generator=g) > 0.3
    keep[..., 0] = True
    empty = keep.clone()
    empty[:, :, :5] = False  # five rows with no kept key
    cases = {"plain": (q, k, v, {})}
    if kernel.supports_mask:
        cases["bool_mask"] = (q, k, v, {"attn_mask": keep.to(device)})
        bias = torch.zeros(keep.shape).masked_fill(~keep, -1e4) + torch.randn(keep.shape, generator=g)
        cases["float_mask"] = (q, k, v, {"attn_mask": bias.to(device, dtype)})
        cases["empty_rows"] = (q, k, v, {"attn_mask": empty.to(device)})
        cases["key_padding"] = (q, k, v, {"attn_mask": keep[:, :, :1].clone().fill_(True)
                                          .index_fill_(-1, torch.arange(20, 29), False).to(device)})
    if kernel.supports_causal:
        cases["causal"] = (make(29, 4), k, v, {"is_causal": True})
    if kernel.supports_gqa:
        cases["gqa"] = (q, make(29, 2), make(29, 2), {})
    return cases


def check_kernel(kernel, device) -> list[dict]:
    from .testing.conformance import ATTENTION_ATOL, reference_attention

    rows = []
    for dtype in sorted(kernel.dtypes & set(ATTENTION_ATOL), key=str):
        if kernel.unsupported(dtype, 64):
            continue
        tol = ATTENTION_ATOL[dtype]
        for case, (q, k, v, kw) in _attention_cases(device, dtype, kernel).items():
            row = {"kernel": kernel.name, "dtype": str(dtype).replace("torch.", ""), "case": case, "tol": tol}
            try:
                ref, ref_lse = reference_attention(q.cpu(), k.cpu(), v.cpu(), scale=0.1,
                                                   **{n: t.cpu() if torch.is_tensor(t) else t for n, t in kw.items()})
                ref = ref.nan_to_num(0.0)
                if kernel.returns_lse:
                    out, lse = kernel.fn(q, k, v, scale=0.1, return_lse=True, **kw)
                    finite = torch.isfinite(ref_lse)
                    lse = lse.double().cpu()
                    row["lse_err"] = (lse[finite] - ref_lse[finite]).abs().max().item()
                    row["empty_lse_ok"] = bool(torch.isneginf(lse[~finite]).all())
                else:
                    out = kernel.fn(q, k, v, scale=0.1, **kw)
                row["err"] = (out.double().cpu() - ref).abs().max().item()
                row["ok"] = (row["err"] <= tol and row.get("lse_err", 0.0) <= max(10 * tol, 2e-6)
                             and row.get("empty_lse_ok", True))
            except Exception as exc:  # a kernel that raises is reported, not fatal
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
            rows.append(row)
    return rows


# -- 4. quantized linears -------------------------------------------------------------------------------------------
def check_quant(backend, device) -> list[dict]:
    from .plugins import manager
    from .quant.spec import QuantSpec
    from .testing.conformance import QUANT_RTOL

    pm = manager()
    emulation = pm.backends.get("cpu_ref")
    rows = []
    g = torch.Generator().manual_seed(0)
    w, x, b = torch.randn(64, 128, generator=g), torch.randn(2, 16, 128, generator=g), torch.randn(64, generator=g)
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    for scheme, granularity, weight_only in QUANT_SPECS:
        spec = QuantSpec(scheme, granularity, weight_only)
        label = f"{scheme}/{granularity}{'/weight_only' if weight_only else ''}"
        path = pm.quantized_linear(backend, spec)
        if path is None:
            rows.append({"spec": label, "path": None, "ok": None, "note": "not served by this backend"})
            continue
        row = {"spec": label, "path": path.name}
        try:
            dtype = torch.bfloat16 if device.type != "cpu" else torch.float32
            y = _quantized_forward(path, w, b, x, device, dtype)
            row["rel_err"] = ((y.double().cpu() - exact).norm() / exact.norm()).item()
            bound = QUANT_RTOL.get((scheme, granularity), 0.08)
            row["ok"] = row["rel_err"] <= bound + (0.01 if dtype == torch.bfloat16 else 0.0)
            if emulation is not None and emulation.probe()[0]:
                ref_path = pm.quantized_linear(emulation, spec)
                if ref_path is not None:
                    ref = _quantized_forward(ref_path, w, b, x, torch.device("cpu"), torch.float32).double()
                    row["vs_emulation"] = ((y.double().cpu() - ref).norm() / ref.norm()).item()
        except Exception as exc:
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
        rows.append(row)
    return rows


def _quantized_forward(path, w, b, x, device, dtype):
    linear = torch.nn.Linear(w.shape[1], w.shape[0]).to(device, dtype)
    with torch.no_grad():
        linear.weight.copy_(w), linear.bias.copy_(b)
        module = path.quantize_module(linear)
        xs = x.to(device, dtype)
        if module is not None:
            return module(xs)
        qweight, scale = path.quantize_weight(linear.weight.detach())
        return path.linear(xs, qweight, scale, linear.bias)


# -- 5. timing -------------------------------------------------------------------------------------------------------
def time_kernel(kernel, device, shape, repeats: int = 3) -> dict:
    dtype = torch.bfloat16 if torch.bfloat16 in kernel.dtypes and device.type != "cpu" else (
        torch.float32 if torch.float32 in kernel.dtypes else sorted(kernel.dtypes, key=str)[0])
    b, h, s, d = shape
    if kernel.unsupported(dtype, d):
        return {"kernel": kernel.name, "shape": list(shape), "note": f"does not serve {dtype} head_dim {d}"}
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype) for _ in range(3))
    with torch.no_grad():
        kernel.fn(q, k, v)  # warm-up (and first-call compilation)
        _sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            kernel.fn(q, k, v)
            _sync(device)
            times.append(time.perf_counter() - start)
    ms = sorted(times)[len(times) // 2] * 1e3
    flops = 4 * b * h * s * s * d
    return {"kernel": kernel.name, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
            "ms": round(ms, 3), "tflops": float(f"{flops / (ms * 1e-3) / 1e12:.3g}")}


# -- 6. open questions -------------------------------------------------------------------------------------------------
def npu_pse_scale_order(device) -> dict:
    """Whether npu_fused_infer_attention_score adds pse_shift before or after the scale."""
    import torch_npu

    from .testing.conformance import reference_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 64, generator=g) for _ in range(3))
    pse = torch.randn(1, 2, 32, 32, generator=g)
    scale = 0.1
    out, _ = torch_npu.npu_fused_infer_attention_score(
        *(t.to(device, torch.float16) for t in (q, k, v)), pse_shift=pse.to(device, torch.float16), num_heads=2,
        input_layout="BNSD", scale=scale)
    out = out.double().cpu()
    after = reference_attention(q, k, v, attn_mask=pse, scale=scale)[0]
    before = reference_attention(q, k, v, attn_mask=pse * scale, scale=scale)[0]
    errs = {"after": (out - after).abs().max().item(), "before": (out - before).abs().max().item()}
    best = min(errs, key=errs.get)
    return {"answer": best if errs[best] < 1e-2 else "neither", "max_err": errs}


def cuda_efficient_empty_row_lse(device) -> dict:
    """What the mem-efficient kernel reports as LSE on a row whose mask keeps no key."""
    q, k, v = (torch.randn(1, 1, 32, 64, device=device, dtype=torch.float16) for _ in range(3))
    bias = torch.zeros(1, 1, 32, 32, device=device, dtype=torch.float16)
    bias[..., :4, :] = float("-inf")
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True)[:2]
    value = lse[0, 0, 0].item()
    return {"answer": "-inf" if value == float("-inf") else repr(value),
            "output_row_max_abs": out[0, 0, :4].abs().max().item()}


QUESTIONS = {"npu": [("pse_before_or_after_scale", npu_pse_scale_order)],
             "cuda": [("efficient_sdpa_empty_row_lse", cuda_efficient_empty_row_lse)]}


# -- the whole run ----------------------------------------------------------------------------------------------------
def run(fast: bool = False, only: list[str] | None = None, conformance: bool = True) -> dict:
    from .plugins import manager

    pm = manager()
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "platform": platform.platform(), "processor": platform.processor()},
              "fast": fast, "backends": backend_report(), "results": {}}
    for record in report["backends"]:
        name = record["name"]
        if not record["available"] or (only and name not in only) or name not in pm.backends:
            continue
        backend = pm.backends[name]
        device = _device(backend)
        result = {"device": str(device)}
        if device.type != "cpu":
            result["device_name"] = _device_name(device)
        shape = FAST_SHAPE if fast else (CPU_SHAPE if device.type == "cpu" else FLUX_SHAPE)
        result["timing_shape_note"] = ("FLUX-like: 1024x1024 image, 4096 tokens, 24 heads x 128" if shape == FLUX_SHAPE
                                       else f"reduced to {shape} on this device (FLUX-like is {FLUX_SHAPE})")
        kernels = pm.attention_kernels(backend)
        result["kernels"] = [row for kernel in kernels for row in check_kernel(kernel, device)]
        result["quant"] = check_quant(backend, device)
        result["timing"] = [time_kernel(kernel, device, shape) for kernel in kernels]
        result["questions"] = {}
        for question, ask in QUESTIONS.get(device.type, []):
            try:
                result["questions"][question] = ask(device)
            except Exception as exc:
                result["questions"][question] = {"answer": None, "error": f"{type(exc).__name__}: {exc}"[:300]}
        if conformance:
            result["conformance"] = run_conformance(name, fast)
        report["results"][name] = result
    return report


def _device_name(device) -> str:
    try:
        return str(getattr(torch, device.type).get_device_name(0))
    except Exception:
        return ""


def table(report: dict) -> str:
    """One table: a row per backend, kernel check, quantized path, timing and question."""
    rows = [["backends", b["name"], "yes" if b["available"] else "no", b["reason"]] for b in report["backends"]]
    for name, result in report["results"].items():
        for kernel in sorted({r["kernel"] for r in result["kernels"]}):
            mine = [r for r in result["kernels"] if r["kernel"] == kernel]
            worst = max((r.get("err", math.inf) for r in mine), default=0.0)
            failed = [f"{r['case']}/{r['dtype']}" for r in mine if not r.get("ok")]
            detail = f"{len(mine)} cases, max err {worst:.2e}" + (f"; failed: {', '.join(failed)}" if failed else "")
            rows.append([f"{name} attention", kernel, "ok" if not failed else "FAIL", detail])
        for q in result["quant"]:
            status = "-" if q["ok"] is None else ("ok" if q["ok"] else "FAIL")
            detail = q.get("note") or q.get("error") or (f"rel err {q['rel_err']:.4f}" + (
                f", vs emulation {q['vs_emulation']:.4f}" if "vs_emulation" in q else ""))
            rows.append([f"{name} quant", f"{q['spec']} ({q['path']})", status, detail])
        for t in result["timing"]:
            rows.append([f"{name} time", t["kernel"], f"{t['ms']} ms" if "ms" in t else "-",
                         t.get("note") or f"{t['dtype']} {tuple(t['shape'])}, {t['tflops']} TFLOP/s"])
        rows.append([f"{name} time", "shape", "", result["timing_shape_note"]])
        for question, answer in result["questions"].items():
            rows.append([f"{name} question", question, str(answer.get("answer")), json.dumps(answer)[:120]])
        if "conformance" in result:
            c = result["conformance"]
            rows.append([f"{name} conformance", c.get("subset", ""), "ok" if c["ok"] else "FAIL", c["summary"]])
    header = ["section", "item", "result", "detail"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(3)]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r[:3], widths)) + "  " + str(r[3])  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths] + ["-" * 6]), *map(line, rows)])


def main(args) -> int:
    report = run(fast=args.fast, only=args.backend or None, conformance=not args.no_conformance)
    print(table(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        print(f"\nwrote {args.out}; if you have hardware nobody has run cachedit on, open an issue with it")
    failed = any(not r.get("ok") for res in report["results"].values() for r in res["kernels"]) or any(
        q["ok"] is False for res in report["results"].values() for q in res["quant"]) or any(
        not res.get("conformance", {"ok": True})["ok"] for res in report["results"].values())
    return 1 if failed else 0
