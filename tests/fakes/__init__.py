"""Faithful stand-ins for vendor libraries and hardware that this machine lacks.

The cuda and ascend fakes live with their plugins' tests (`plugins/cuda/tests/fake_cuda.py`,
`fake_flash_attn.py`; `plugins/ascend/tests/fake_torch_npu.py`); this package keeps what is shared
(`reference`) and the placement fake (`accelerator`).

Each fake keeps the vendor's documented signature and *rejects* what the real thing rejects (wrong
layout, dtype, shape, missing or misspelled arguments), then computes the documented result on the
CPU in float64, so a plugin's calls are checked against the vendor documentation and its outputs
against reference math:

- `fake_cuda.FakeCuda`: a CUDA build with N devices of a chosen compute capability (torch.version.cuda,
  torch.cuda.*, cuDNN and flash-attention build flags), monkeypatched.
- `fake_cuda.FakeTorchSDPA`: torch's CUDA SDPA backends (sdpa_kernel + F.scaled_dot_product_attention, and
  the aten ops that return the log-sum-exp) with the constraints of
  aten/src/ATen/native/transformers/cuda/sdp_utils.cpp.
- `fake_cuda.strict_scaled_mm` / `fake_cuda.strict_int_mm`: the CUDA-only checks of torch._scaled_mm
  (ScaledBlas.cpp) and torch._int_mm (Blas.cpp) in front of the real CPU ops.
- `fake_flash_attn.make_flash_attn_interface`: FlashAttention-3's `flash_attn_interface` module
  (hopper/flash_attn_interface.py signature, hopper/flash_api.cpp checks).
- `fake_torch_npu.make_torch_npu`: torch_npu 2.13.0's npu namespace, npu_fusion_attention (dropping its pse
  under graph mode, as torchair's converter does), npu_fused_infer_attention_score, npu_dynamic_quant,
  npu_quant_matmul, npu_weight_quant_batchmatmul (torch_npu/_op_plugin_docs.py and
  torch_npu/op_plugin/meta/_meta_registrations.py of the 2.13.0 wheel), with either reading of the
  docs' pse/scale order.
- `accelerator.accelerator`: a stand-in accelerator (the `meta` device holding real CPU data) on which
  any host/device mix in an op, and any host tensor in a collective, raises `PlacementError`.

The torchao fake is torchao itself (0.18, a test dependency): under `FakeCuda` its float8 configs run on
CPU tensors and assert what they assert on a GPU (bfloat16 weights for PerRow).
"""
