"""The neutral record of one quantized weight that torchao and compressed-tensors agree on (``Codes``), and the
compressed-tensors argument sets aockpt maps exactly; a leaf, so the readers (ct_codes), the layout
(ct_format) and the builders (ct_torchao) share it without importing each other in a circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


INT4_MID = 8  # tinygemm's unsigned-to-signed offset (relayout/canonical.py)


@dataclass
class Codes:
    """One quantized weight as compressed-tensors stores it before packing.

    codes: int8 [N, K] (integer schemes), float8_e4m3fn [N, K], or uint8 [N, K/2] of two E2M1 codes (fp4,
    element 2i in the low nibble: both libraries' order). scale: [N, 1], [1], [N, K/g], or fp4 block scales
    (float8_e4m3fn for NVFP4, uint8 E8M0 exponents for MXFP4). zero_point: int8, same shape as scale.
    """

    weights: dict[str, Any]  # compressed-tensors QuantizationArgs fields of the weight
    input_activations: dict[str, Any] | None
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None  # NVFP4: float32 [1], a divisor (w = fp4 * scale / global_scale)
    shape: tuple[int, int] = (0, 0)
    dtype: torch.dtype = torch.bfloat16  # the outer dtype the weight dequantizes to
    error: float = 0.0  # max |compressed-tensors dequantization - torchao dequantize()|, 0.0 when exact
    notes: list[str] = field(default_factory=list)


INT8_TOKEN = dict(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
INT8_TOKEN_ASYM = dict(num_bits=8, type="int", symmetric=False, strategy="token", dynamic=True)
FP8_TOKEN = dict(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)
FP8_TENSOR_DYN = dict(num_bits=8, type="float", symmetric=True, strategy="tensor", dynamic=True)
NVFP4_WEIGHTS = dict(num_bits=4, type="float", symmetric=True, strategy="tensor_group", dynamic=False,
                     group_size=16, scale_dtype="float8_e4m3fn")
NVFP4_FORMAT = "nvfp4-pack-quantized"
MXFP4_WEIGHTS = dict(num_bits=4, type="float", symmetric=True, strategy="group", dynamic=False, group_size=32,
                     scale_dtype="uint8")
