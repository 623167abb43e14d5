"""compressed-tensors codes -> the torchao 0.18 tensor whose ``dequantize()`` equals compressed-tensors'
decompression bit for bit (the import direction of ``aockpt/ct_codes.py``)."""

from __future__ import annotations

from typing import Any

import torch

from . import ct_format
from .ct_codes import nearby
from .ct_record import FP8_TENSOR_DYN, FP8_TOKEN, INT8_TOKEN, INT8_TOKEN_ASYM, NVFP4_FORMAT, Codes
from .errors import UnsupportedTensorError
from .registry import TENSOR_TYPES


def target_type(weights: dict[str, Any], acts: dict[str, Any] | None, where: str) -> str:
    """The torchao 0.18 type a compressed-tensors weight scheme becomes; refused where none is exact."""
    w = weights
    kind = (w.get("type"), w.get("num_bits"), w.get("strategy"))
    if kind == ("int", 8, "channel") and w.get("symmetric") and acts in (None, INT8_TOKEN):
        return "Int8Tensor"
    if kind[0] == "int" and kind[2] in ("channel", "group") and acts in (None, INT8_TOKEN_ASYM):
        return "IntxUnpackedToInt8Tensor"
    if kind[:2] == ("float", 8) and kind[2] in ("channel", "tensor", "block") and acts in (None, FP8_TOKEN, FP8_TENSOR_DYN):
        return "Float8Tensor"
    if kind == ("float", 4, "tensor_group") and w.get("group_size") == 16 and acts is None:
        return "NVFP4Tensor"
    if kind == ("float", 4, "group") and w.get("group_size") == 32 and acts is None:
        return "MXTensor"
    raise UnsupportedTensorError(
        f"{where}: compressed-tensors scheme {kind[0]}{kind[1]} {kind[2]} (activations {acts}) has no torchao 0.18 "
        "counterpart aockpt builds; load it with compressed-tensors instead")


def to_torchao(c: Codes, where: str) -> torch.Tensor:
    """The torchao 0.18 tensor whose dequantize() equals compressed-tensors' decompression of `c`."""
    return _BUILDERS[target_type(c.weights, c.input_activations, where)](c, where)


def _make_mx(c: Codes, where: str) -> torch.Tensor:
    from torchao.quantization.quantize_.common import KernelPreference

    cls = TENSOR_TYPES["MXTensor"].cls
    return cls(c.codes.view(torch.uint8), c.scale.view(torch.float8_e8m0fnu), torch.float4_e2m1fn_x2, 32, c.dtype,
               KernelPreference.EMULATED, None, False)


def _make_int8(c: Codes, where: str) -> torch.Tensor:
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows import QuantizeTensorToInt8Kwargs

    acts = QuantizeTensorToInt8Kwargs(granularity=PerRow()) if c.input_activations else None
    cls = TENSOR_TYPES["Int8Tensor"].cls
    return cls(c.codes, c.scale.reshape(-1, 1), [1, c.shape[1]], c.dtype,
               zero_point=torch.zeros(c.shape[0], 1, dtype=torch.int8), act_quant_kwargs=acts)


def _make_intx(c: Codes, where: str) -> torch.Tensor:
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8TensorActivationQuantization as Acts,
    )

    w = c.weights
    group = w["group_size"] if w["strategy"] == "group" else c.shape[1]
    zp = c.zero_point if c.zero_point is not None else torch.zeros_like(c.scale, dtype=torch.int8)
    acts = Acts.INT8_ASYM_PER_TOKEN if c.input_activations else None
    cls = TENSOR_TYPES["IntxUnpackedToInt8Tensor"].cls
    return cls(c.codes, c.scale, zp.to(torch.int8), getattr(torch, f"int{w['num_bits']}"), (1, group), c.dtype, acts)


def _make_float8(c: Codes, where: str) -> torch.Tensor:
    from torchao.quantization import PerRow, PerTensor
    from torchao.quantization.quantize_.workflows import QuantizeTensorToFloat8Kwargs

    n, k = c.shape
    strategy, a = c.weights["strategy"], c.input_activations
    acts = None
    if a is not None:
        acts = QuantizeTensorToFloat8Kwargs(granularity=PerRow() if a == FP8_TOKEN else PerTensor())
    cls = TENSOR_TYPES["Float8Tensor"].cls
    if strategy == "block":
        return cls(c.codes, c.scale, list(c.weights["block_structure"]), act_quant_kwargs=acts, dtype=c.dtype)
    per_row = strategy == "channel"
    return cls(c.codes, c.scale.reshape(n if per_row else 1, 1), [1, k] if per_row else [n, k],
               act_quant_kwargs=acts, dtype=c.dtype)


def _make_nvfp4(c: Codes, where: str) -> torch.Tensor:
    cls = TENSOR_TYPES["NVFP4Tensor"].cls
    g = c.global_scale.float().reshape(())
    if torch.equal(g, torch.ones((), dtype=torch.float32)):
        return cls(c.codes, c.scale, 16, c.dtype)
    want = ct_format.decompress(ct_format.to_parts(c, NVFP4_FORMAT), ct_format.scheme(c), NVFP4_FORMAT).to(c.dtype)
    p = nearby(1.0 / g, lambda p: torch.equal(cls(c.codes, c.scale, 16, c.dtype, per_tensor_scale=p).dequantize(), want))
    if p is None:
        raise UnsupportedTensorError(f"{where}: no float32 per-tensor scale makes torchao's NVFP4 dequantize() equal "
                                     f"compressed-tensors' decompression for global scale {g.item():.9g}; load it "
                                     "with compressed-tensors")
    return cls(c.codes, c.scale, 16, c.dtype, per_tensor_scale=p)


_BUILDERS = {"Int8Tensor": _make_int8, "IntxUnpackedToInt8Tensor": _make_intx, "Float8Tensor": _make_float8,
             "NVFP4Tensor": _make_nvfp4, "MXTensor": _make_mx}
