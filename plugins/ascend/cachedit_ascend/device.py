"""Which Ascend SoCs the plugin's ops are documented for.

torch_npu 2.13's docs list npu_fused_infer_attention_score, npu_quant_matmul (with pertoken_scale) and
npu_weight_quant_batchmatmul (bfloat16) for Atlas A2 (SoC names Ascend910B1..B4, e.g. "Ascend910B3")
and Atlas A3 (Ascend910_93xx). The first-generation 910 (Ascend910A, Ascend910ProA/ProB,
Ascend910PremiumA) and the Atlas inference cards (Ascend310*) are not among them, so they get none.
"""

from __future__ import annotations

import re

_A2_A3 = re.compile(r"^Ascend910(B\d|_93\d\d)")


def is_atlas_a2_a3(name: str) -> bool:
    """Whether the SoC name (torch_npu.npu.get_device_name) is an Atlas A2 or A3 part."""
    return bool(_A2_A3.match(name or ""))


def why_not(name: str) -> str:
    """Why the A2/A3 ops are not offered on `name` ("" when they are)."""
    if is_atlas_a2_a3(name):
        return ""
    return (f"{name or 'this NPU (name unknown)'} is not an Atlas A2/A3 part (Ascend910B*, Ascend910_93*), which "
            "torch_npu documents these ops for")
