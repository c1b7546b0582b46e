"""torch_npu 2.13.0 as far as the ascend plugin uses it, from the wheel's own documentation.

Signatures and checks come from torch_npu/_op_plugin_docs.py and
torch_npu/op_plugin/meta/_meta_registrations.py of torch_npu-2.13.0 (read out of the wheel, not
vendored); results are computed on the CPU in float64 the way Huawei's own benchmark reference
(msprobe's npu_fusion_attention bench function) computes them: scores = (q k^T + pse) * scale, then
the mask, softmax_max / softmax_sum of the scaled scores, broadcast 8 wide.

Strict on the points that bit: under `graph_mode` npu_fusion_attention drops its pse (torchair's converter
passes real_shift=None) and records the drop; `pse_before_scale` picks one of the two readings of the docs;
npu_fused_infer_attention_score without inner_precise 2/3 gives garbage on rows with no kept key and
reports LSE 0 there, and accepts only the mask / pse shapes its docs list.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import types

import torch

from tests.fakes.reference import VendorError, vendor_check, attention64

_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")


def _fusion_attention(calls, state):
    def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                             scale=1., keep_prob=1., pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0,
                             prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                             gen_mask_parallel=True, sync=False, softmax_layout=""):
        vendor_check(isinstance(input_layout, str) and input_layout.upper() in _LAYOUTS,
               f"input_layout must be one of {_LAYOUTS}, got {input_layout!r}")
        layout = input_layout.upper()
        vendor_check(layout in ("BNSD", "BSND"), f"fake: layout {layout} is not modelled")
        vendor_check(query.dtype in (torch.float16, torch.bfloat16, torch.float32),
               f"query dtype must be float16, bfloat16 or float32, got {query.dtype}")
        vendor_check(query.dtype == key.dtype == value.dtype, "query, key and value must have the same dtype")
        vendor_check(query.dim() == 4 and key.dim() == 4 and value.dim() == 4, f"{layout} takes 4-D tensors")
        q, k, v = (t if layout == "BNSD" else t.transpose(1, 2) for t in (query, key, value))
        b, n, lq, d = q.shape
        nkv, lk, dk = k.shape[1], k.shape[2], k.shape[3]
        vendor_check(isinstance(head_num, int) and head_num == n, f"head_num ({head_num}) must be the query's N ({n})")
        vendor_check(tuple(k.shape[:3]) == tuple(v.shape[:3]), "key and value must have the same shape")
        vendor_check(k.shape[0] == b, "batch sizes must be equal")
        vendor_check(d == dk and dk >= v.shape[3] and 1 <= d <= 768, "head dim: Dq == Dk >= Dv, in 1..768")
        vendor_check(1 <= n <= 256 and n % nkv == 0, "Nq must be in 1..256 and a multiple of Nkv")
        vendor_check(padding_mask is None, "padding_mask is not supported yet")
        vendor_check(0 < keep_prob <= 1, "keep_prob must be in (0, 1]")
        vendor_check(keep_prob == 1, "fake: dropout (keep_prob < 1) is not modelled")
        vendor_check(isinstance(scale, float), f"scale is a float, got {type(scale).__name__}")
        vendor_check(prefix is None and actual_seq_qlen is None and actual_seq_kvlen is None and softmax_layout == "",
               "fake: prefix / varlen arguments are not modelled")
        vendor_check(sparse_mode in range(0, 7), f"sparse_mode {sparse_mode}: BNSD supports 0..6")
        pre_bias = post_bias = None
        dropped = []
        if pse is not None:
            vendor_check(pse.dtype == query.dtype, "query, key, value and pse must have the same dtype")
            vendor_check(pse.dim() == 4 and tuple(pse.shape) in {(b, n, lq, lk), (b, n, 1, lk), (1, n, lq, lk)},
                   f"pse must be BNSS, BN1Skv or 1NSS, got {tuple(pse.shape)}")
            if state["graph_mode"]:  # torchair's converter passes real_shift=None: the pse never reaches the op
                dropped.append("pse")
            elif state["pse_before_scale"]:
                pre_bias = pse
            else:
                post_bias = pse
        masked = None
        if atten_mask is not None:
            vendor_check(atten_mask.dtype in (torch.bool, torch.uint8), "atten_mask must be bool or uint8")
            if sparse_mode in (2, 3, 4):
                tri = torch.ones(2048, 2048, dtype=torch.bool).triu(1)
                vendor_check(tuple(atten_mask.shape) == (2048, 2048) and torch.equal(atten_mask.bool().cpu(), tri),
                       f"sparse_mode {sparse_mode} takes the compressed 2048x2048 upper-triangular atten_mask")
                vendor_check(sparse_mode != 3 or lq <= lk, "sparse_mode 3 needs Sq <= Skv")
                vendor_check(sparse_mode != 4, "fake: band mode is not modelled")
                diag = 1 if sparse_mode == 2 else lk - lq + 1
                masked = torch.ones(lq, lk, dtype=torch.bool).triu(diag)
            else:
                vendor_check(sparse_mode in (0, 1), f"fake: sparse_mode {sparse_mode} is not modelled")
                shapes = {(lq, lk), (1, 1, lq, lk), (b, 1, lq, lk), (b, n, lq, lk)}
                vendor_check(tuple(atten_mask.shape) in shapes, f"atten_mask must be SS, 11SS, B1SS or BNSS, got "
                                                          f"{tuple(atten_mask.shape)}")
                vendor_check(atten_mask.is_contiguous(), "atten_mask must be contiguous")
                vendor_check(sparse_mode == 1 or (pre_tockens >= lq and next_tockens >= lk),
                       "sparse_mode 0: pre_tockens/next_tockens must cover the mask")
                masked = atten_mask.bool()
        keep = None if masked is None else ~masked
        out, lse, rowmax = attention64(q, k, v, scale=scale, keep=keep, pre_scale_bias=pre_bias, bias=post_bias,
                                       return_max=True)
        # softmax_max: row max of the scaled, masked scores; softmax_sum: sum(exp(scores - max)); 8 copies each
        finite = torch.isfinite(rowmax)
        ssum = torch.where(finite, torch.exp(lse - torch.where(finite, rowmax, torch.zeros_like(rowmax))),
                           torch.zeros_like(lse))
        smax = rowmax.float().unsqueeze(-1).expand(b, n, lq, 8).contiguous()
        ssum = ssum.float().unsqueeze(-1).expand(b, n, lq, 8)
        out = out.to(query.dtype)
        if layout == "BSND":
            out = out.transpose(1, 2).contiguous()
        calls.append({"op": "npu_fusion_attention", "layout": layout, "sparse_mode": sparse_mode,
                      "mask": None if atten_mask is None else tuple(atten_mask.shape),
                      "pse": None if pse is None else tuple(pse.shape), "inner_precise": inner_precise,
                      "scale": scale, "dropped": dropped})
        return out, smax, ssum.contiguous(), torch.empty(0, dtype=query.dtype), 0, 0, 0

    return npu_fusion_attention


def _fused_infer_attention(calls, state):
    def npu_fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None,
                                        actual_seq_lengths_kv=None, dequant_scale1=None, quant_scale1=None,
                                        dequant_scale2=None, quant_scale2=None, quant_offset2=None,
                                        antiquant_scale=None, antiquant_offset=None, block_table=None,
                                        query_padding_size=None, kv_padding_size=None, key_antiquant_scale=None,
                                        key_antiquant_offset=None, value_antiquant_scale=None,
                                        value_antiquant_offset=None, key_shared_prefix=None, value_shared_prefix=None,
                                        actual_shared_prefix_len=None, query_rope=None, key_rope=None,
                                        key_rope_antiquant_scale=None, num_heads=1, scale=1.0, pre_tokens=2147483647,
                                        next_tokens=2147483647, input_layout="BSH", num_key_value_heads=0,
                                        sparse_mode=0, inner_precise=0, block_size=0, antiquant_mode=0,
                                        softmax_lse_flag=False, key_antiquant_mode=0, value_antiquant_mode=0):
        vendor_check(input_layout in ("BSH", "BSND", "BNSD", "BNSD_BSND", "TND"), f"input_layout {input_layout!r}")
        vendor_check(input_layout == "BNSD", f"fake: layout {input_layout} is not modelled")
        vendor_check(query.dtype in (torch.float16, torch.bfloat16), f"fake: query float16 or bfloat16 (int8 not "
                                                               f"modelled), got {query.dtype}")
        vendor_check(query.dtype == key.dtype == value.dtype, "query, key and value must have the same dtype")
        vendor_check(all(t.is_contiguous() for t in (query, key, value)), "non-contiguous query/key/value are not supported")
        vendor_check(query.dim() == 4 and key.shape == value.shape, "BNSD 4-D inputs; key and value of one shape")
        b, n, lq, d = query.shape
        nkv, lk = key.shape[1], key.shape[2]
        vendor_check(num_heads == n, f"num_heads ({num_heads}) must be the query's N ({n}) in BNSD")
        vendor_check(num_key_value_heads in (0, nkv) and (num_key_value_heads or n) == nkv,
               f"num_key_value_heads ({num_key_value_heads}) must be key's N ({nkv}), or 0 when equal to num_heads")
        vendor_check(n % nkv == 0 and n // nkv <= 64 and n <= 256 and d <= 512, "N <= 256, N/KV_N <= 64, D <= 512")
        vendor_check(isinstance(scale, float), f"scale is a float, got {type(scale).__name__}")
        vendor_check(inner_precise in (0, 1, 2, 3), "inner_precise is 0..3")
        unmodelled = (dequant_scale1, quant_scale1, dequant_scale2, quant_scale2, quant_offset2, antiquant_scale,
                      antiquant_offset, block_table, query_padding_size, kv_padding_size, key_antiquant_scale,
                      key_antiquant_offset, value_antiquant_scale, value_antiquant_offset, key_shared_prefix,
                      value_shared_prefix, actual_shared_prefix_len, query_rope, key_rope, actual_seq_lengths)
        vendor_check(all(a is None for a in unmodelled), "fake: quantization / paging / prefix / rope are not modelled")
        pre_bias = post_bias = None
        if pse_shift is not None:
            vendor_check(pse_shift.dtype == query.dtype, "pse_shift must have the query's dtype")
            vendor_check(tuple(pse_shift.shape) in {(b, n, lq, lk), (1, n, lq, lk)},
                   f"pse_shift must be (B, N, Q_S, KV_S) or (1, N, Q_S, KV_S), got {tuple(pse_shift.shape)}")
            vendor_check(pse_shift.is_contiguous(), "non-contiguous pse_shift is not supported")
            vendor_check(d % 16 == 0, "pse_shift needs D divisible by 16")
            if state["pse_before_scale"]:
                pre_bias = pse_shift
            else:
                post_bias = pse_shift
        allowed = torch.ones(b, 1, lq, lk, dtype=torch.bool)
        if actual_seq_lengths_kv is not None:
            lens = list(actual_seq_lengths_kv)
            vendor_check(len(lens) == 1 or len(lens) >= b, "actual_seq_lengths_kv: one length, or at least one per batch")
            vendor_check(all(0 <= x <= lk for x in lens), "actual_seq_lengths_kv must be in [0, KV_S]")
            lens = lens * b if len(lens) == 1 else lens[:b]
            allowed = allowed & (torch.arange(lk) < torch.tensor(lens).reshape(b, 1, 1, 1))
        if atten_mask is not None:
            vendor_check(atten_mask.dtype in (torch.bool, torch.int8, torch.uint8), "atten_mask is bool, int8 or uint8")
            vendor_check(atten_mask.is_contiguous(), "non-contiguous atten_mask is not supported")
            if sparse_mode in (2, 3, 4):
                tri = torch.ones(2048, 2048, dtype=torch.bool).triu(1)
                vendor_check(tuple(atten_mask.shape)[-2:] == (2048, 2048)
                       and torch.equal(atten_mask.bool().reshape(2048, 2048), tri),
                       f"sparse_mode {sparse_mode} takes the optimised 2048x2048 atten_mask")
                vendor_check(sparse_mode == 3 and lq <= lk, "fake: sparse_mode 3 with Q_S <= KV_S only")
                allowed = allowed & ~torch.ones(lq, lk, dtype=torch.bool).triu(lk - lq + 1)
            else:
                vendor_check(sparse_mode in (0, 1), f"sparse_mode {sparse_mode} is not supported")
                shapes = {(lq, lk), (1, lq, lk), (b, 1, lq, lk), (1, 1, lq, lk)}
                vendor_check(tuple(atten_mask.shape) in shapes, f"atten_mask must be (Q_S, KV_S), (1, Q_S, KV_S), "
                                                          f"(B, 1, Q_S, KV_S) or (1, 1, Q_S, KV_S), got "
                                                          f"{tuple(atten_mask.shape)}")
                allowed = allowed & ~atten_mask.bool().reshape((1,) * (4 - atten_mask.dim()) + tuple(atten_mask.shape))
        else:
            vendor_check(sparse_mode in (0, 1) or sparse_mode not in (2, 3, 4), "sparse_mode 2/3/4 need the atten_mask")
        out, lse = attention64(query, key, value, scale=scale, keep=allowed, pre_scale_bias=pre_bias, bias=post_bias)
        empty = torch.isneginf(lse)
        if inner_precise < 2:  # no row-invalid correction: documented to lose precision there (modelled: garbage)
            out = torch.where(empty.unsqueeze(-1), value.double().mean(-2, keepdim=True).repeat_interleave(
                n // nkv, 1).expand_as(out), out)
        lse = torch.where(empty, torch.zeros_like(lse), lse)  # not documented for such rows: not -inf here
        calls.append({"op": "npu_fused_infer_attention_score", "layout": input_layout, "sparse_mode": sparse_mode,
                      "mask": None if atten_mask is None else tuple(atten_mask.shape),
                      "pse": None if pse_shift is None else tuple(pse_shift.shape), "inner_precise": inner_precise,
                      "scale": scale, "kv_lens": None if actual_seq_lengths_kv is None else list(actual_seq_lengths_kv),
                      "lse": softmax_lse_flag, "dropped": []})
        lse_out = lse.float().unsqueeze(-1) if softmax_lse_flag else torch.zeros(1)
        return out.to(query.dtype), lse_out

    return npu_fused_infer_attention_score


def _dynamic_quant(calls):
    def npu_dynamic_quant(x, *, smooth_scales=None, group_index=None, dst_type=None):
        vendor_check(x.dtype in (torch.float16, torch.bfloat16), f"x must be float16 or bfloat16, got {x.dtype}")
        vendor_check(x.dim() > 1, "x must have more than one dimension")
        vendor_check(smooth_scales is None and group_index is None, "fake: smooth_scales / group_index are not modelled")
        vendor_check(dst_type in (None, torch.int8), "fake: only int8 output is modelled")
        x32 = x.float()
        scale = x32.abs().amax(dim=-1) / 127.0
        y = torch.where(scale.unsqueeze(-1) > 0, x32 / scale.unsqueeze(-1), torch.zeros_like(x32))
        calls.append({"op": "npu_dynamic_quant", "shape": tuple(x.shape), "dtype": x.dtype})
        return y.round().clamp(-128, 127).to(torch.int8), scale

    return npu_dynamic_quant


def _quant_matmul(calls):
    def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None):
        vendor_check(x1.dtype == torch.int8 and x2.dtype == torch.int8, "fake: x1 and x2 must be int8 (int4 not modelled)")
        vendor_check(2 <= x1.dim() <= 6 and 2 <= x2.dim() <= 6, "x1 and x2 must have 2 to 6 dims")
        m, k = x1.shape[-2], x1.shape[-1]
        n = x2.shape[-1]
        vendor_check(x2.shape[-2] == k, "k dim of x1 and x2 need be same")
        vendor_check(k <= 65535 and n <= 65535, "last dims of x1 and x2 must not exceed 65535")
        vendor_check(scale.dim() == 1 and scale.shape[0] in (1, n), "the scale must be 1-D of size 1 or n")
        vendor_check(scale.dtype in (torch.float32, torch.bfloat16), "fake: scale float32 or bfloat16 (int64 via "
                                                               "npu_trans_quant_param is not modelled)")
        vendor_check(offset is None, "fake: offset (int8 output) is not modelled")
        vendor_check(output_dtype in (torch.float16, torch.bfloat16),
               f"fake: output_dtype float16 or bfloat16 (None means int8 output), got {output_dtype}")
        if scale.dtype == torch.bfloat16:
            vendor_check(output_dtype == torch.bfloat16, "When scale's dtype is bfloat16, output_dtype must be bfloat16")
        if pertoken_scale is not None:
            vendor_check(pertoken_scale.dim() == 1 and pertoken_scale.shape[0] == m and pertoken_scale.dtype == torch.float32,
                   "pertoken_scale must be float32 of shape (m,)")
        if output_dtype == torch.float16 and pertoken_scale is not None:
            vendor_check(scale.dtype == torch.float32, "float16 output with pertoken_scale takes a float32 scale")
        if bias is not None:
            vendor_check(bias.dim() in (1, 3) and bias.shape[-1] == n, "bias must be (n,) or (batch, 1, n)")
            vendor_check(bias.dtype in (torch.int32, torch.bfloat16, torch.float32, torch.float16),
                   "bias's type supported for int32, bfloat16, float16 and float32")
            if bias.dtype == torch.bfloat16:
                vendor_check(output_dtype == torch.bfloat16, "When bias dtype is bfloat16, output_dtype must be bfloat16")
            if pertoken_scale is not None and bias.dtype == torch.float16:
                vendor_check(output_dtype == torch.float16, "float16 bias with pertoken needs float16 output")
            if pertoken_scale is None:
                vendor_check(bias.dtype != torch.float16, "Bias dtype cannot be float16 when pertoken not given.")
                if output_dtype == torch.float16:
                    vendor_check(bias.dtype == torch.int32, "float16 output without pertoken_scale takes an int32 bias")
        acc = x1.long() @ x2.long()
        if bias is not None and bias.dtype == torch.int32:
            acc = acc + bias.long()
        y = acc.double() * scale.double()
        if pertoken_scale is not None:
            y = y * pertoken_scale.double().unsqueeze(-1)
        if bias is not None and bias.dtype != torch.int32:
            y = y + bias.double()
        calls.append({"op": "npu_quant_matmul", "x2_transposed": x2.stride(-2) == 1 and x2.stride(-1) != 1,
                      "pertoken": pertoken_scale is not None, "scale": tuple(scale.shape),
                      "output_dtype": output_dtype, "bias": None if bias is None else bias.dtype})
        return y.to(output_dtype)

    return npu_quant_matmul


def _weight_quant_batchmatmul(calls):
    def npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None,
                                     quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0):
        vendor_check(x.dtype in (torch.float16, torch.bfloat16), "x must be float16 or bfloat16")
        vendor_check(x.dim() == 2 and weight.dim() == 2, "x and weight must be (M, K) and (K, N)")
        vendor_check(weight.dtype == torch.int8, "fake: int8 weight only (int4 via int32 not modelled)")
        m, k = x.shape
        n = weight.shape[1]
        vendor_check(weight.shape[0] == k and 1 <= k <= 65535 and 1 <= n <= 65535, "K, N in [1, 65535] and matching")
        vendor_check(antiquant_scale.dtype == x.dtype, "antiquant_scale must have x's dtype")
        vendor_check(tuple(antiquant_scale.shape) in {(1,), (1, 1), (1, n), (n,)}, "per-tensor or per-channel scale")
        vendor_check(antiquant_offset is None and quant_scale is None and quant_offset is None and antiquant_group_size == 0,
               "fake: offsets, output quantization and groups are not modelled")
        if bias is not None:
            want = torch.float32 if x.dtype == torch.bfloat16 else torch.float16
            vendor_check(bias.dtype == want, f"bias must be {want} for {x.dtype} x")
            vendor_check(bias.is_contiguous() and bias.shape[-1] == n, "bias (n,) or (1, n), contiguous")
        w = weight.double() * antiquant_scale.double().reshape(1, -1)
        y = x.double() @ w
        if bias is not None:
            y = y + bias.double()
        calls.append({"op": "npu_weight_quant_batchmatmul", "dtype": x.dtype})
        return y.to(x.dtype)

    return npu_weight_quant_batchmatmul


def make_torch_npu(devices: int = 1, available: bool = True, device_name: str = "Ascend910B3",
                   graph_mode: bool = False, pse_before_scale: bool = True) -> types.ModuleType:
    """`graph_mode`: calls behave as under the plugin's NPU graph backend (torchair's converters), recording what
    they drop. `pse_before_scale`: which reading of the docs the fake ops follow (the 2.13 docs contradict
    each other on whether pse is added before or after the scale)."""
    module = types.ModuleType("torch_npu")
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)  # importlib.util.find_spec works on it
    module.__version__ = "2.13.0"
    module.calls = []
    module.npu = types.SimpleNamespace(
        is_available=lambda: available and devices > 0,
        device_count=lambda: devices if available else 0,
        get_device_name=lambda device=None: device_name,
    )
    module.state = {"graph_mode": graph_mode, "pse_before_scale": pse_before_scale}
    module.npu_fusion_attention = _fusion_attention(module.calls, module.state)
    module.npu_fused_infer_attention_score = _fused_infer_attention(module.calls, module.state)
    module.npu_dynamic_quant = _dynamic_quant(module.calls)
    module.npu_quant_matmul = _quant_matmul(module.calls)
    module.npu_weight_quant_batchmatmul = _weight_quant_batchmatmul(module.calls)
    module.VendorError = VendorError
    return module


class FailingImport(importlib.abc.MetaPathFinder):
    """Makes `import torch_npu` fail the way it does without CANN."""

    def __init__(self, name: str = "torch_npu", message: str = "libhccl.so: cannot open shared object file: "
                                                               "No such file or directory"):
        self.name, self.message = name, message

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise ImportError(self.message)
        return None


__all__ = ["make_torch_npu", "FailingImport", "VendorError"]
