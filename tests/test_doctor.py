"""`cachedit doctor` on cpu_ref (its --fast mode: tiny shapes, a conformance subset): the table, the JSON, and
that a kernel which is wrong on rows with no kept key is reported as failing."""

from __future__ import annotations

import json

import torch

from cachedit import AttentionKernel, doctor
from cachedit.cli import main


def test_doctor_prints_one_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "doctor.json"
    assert main(["doctor", "--fast", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "cpu_ref attention" in text and "cpu_ref quant" in text and "cpu_ref conformance" in text
    assert "reduced to" in text  # the CPU's timing shape says it is not FLUX's
    report = json.loads(out.read_text())
    names = {b["name"]: b for b in report["backends"]}
    assert names["cpu_ref"]["available"] and not names["cuda"]["available"] and names["cuda"]["reason"]
    result = report["results"]["cpu_ref"]
    cases = {(r["kernel"], r["case"]) for r in result["kernels"]}
    assert {("math", "empty_rows"), ("math", "float_mask"), ("math", "causal")} <= cases
    assert all(r["ok"] for r in result["kernels"])
    assert all(q["ok"] for q in result["quant"]) and result["conformance"]["ok"]
    assert all(t["ms"] > 0 for t in result["timing"])


def test_doctor_reports_a_kernel_wrong_on_empty_rows():
    from cachedit.testing.conformance import reference_attention

    def finite_lse(q, k, v, *, attn_mask=None, is_causal=False, scale=None, return_lse=False):
        out, lse = reference_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
        out, lse = out.nan_to_num(0.0).to(q.dtype), lse.float()
        return (out, torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)) if return_lse else out

    kernel = AttentionKernel(name="zero_lse", fn=finite_lse, dtypes=frozenset({torch.float32}), head_dims=(1, 256),
                             returns_lse=True, supports_mask=True, supports_causal=True, supports_gqa=True)
    rows = {r["case"]: r for r in doctor.check_kernel(kernel, torch.device("cpu"))}
    assert not rows["empty_rows"]["ok"] and rows["empty_rows"]["empty_lse_ok"] is False
    assert rows["plain"]["ok"] and rows["bool_mask"]["ok"]
