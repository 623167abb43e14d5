"""torchao tensors <-> compressed-tensors codes: one neutral record per quantized weight, both directions.

A ``Codes`` record is what both libraries agree a quantized weight is: integer or float codes, a scale, an
optional integer zero point and an optional NVFP4 global scale, plus compressed-tensors' ``QuantizationArgs``
fields. ``READERS`` (one per registry row) read a torchao 0.18 tensor into one, refusing what has no exact
counterpart; ``reference`` is torchao's dequantized weight a lossy export is measured against;
``aockpt/ct_torchao.py`` builds the torchao tensor a compressed-tensors weight stands for. Which torchao type maps how is data:
``MAPPINGS`` in ``aockpt/ct_table.py``, keyed by registry rows.
"""

from __future__ import annotations

from typing import Any

import torch

from . import codec, ct_format
from .ct_record import Codes, FP8_TENSOR_DYN, FP8_TOKEN, INT4_MID, INT8_TOKEN, INT8_TOKEN_ASYM, MXFP4_WEIGHTS, NVFP4_FORMAT, NVFP4_WEIGHTS
from .registry import tensor_type_of
from .relayout import xpu
from .relayout.canonical import Int4Canonical, bytes_to_nibbles, dequantize


def _int_args(bits: int, strategy: str, group: int | None, symmetric: bool) -> dict[str, Any]:
    """compressed-tensors weight args of an integer scheme."""
    args = dict(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy, dynamic=False)
    return {**args, "group_size": group} if strategy == "group" else args


class Refused(Exception):
    """A tensor with no exact compressed-tensors counterpart; the message says why (no tensor name)."""


def _require(ok: bool, why: str) -> None:
    if not ok:
        raise Refused(why)


def _group(block_size: Any, shape: torch.Size) -> tuple[str, int | None]:
    """compressed-tensors strategy and group size of a torchao row-wise block size [1, g]."""
    n, k = shape
    block = list(block_size)
    if block == [n, k]:
        return "tensor", None
    _require(len(block) == 2 and block[0] == 1, f"block size {block} is neither per-row groups nor per-tensor")
    return ("channel", None) if block[1] == k else ("group", block[1])


# torchao -> codes, one reader per registry row (exact, or Refused)

def _int8(t: torch.Tensor, packer: str | None) -> Codes:
    _require(t.zero_point is None or not t.zero_point.any(), "its zero points are not all zero (asymmetric int8)")
    _require(t.act_quant_scale is None and t.act_pre_scale is None, "it has a static activation scale or pre-scale")
    _require(not t.reduce_range, "it was quantized with reduce_range")
    strategy, group = _group(t.block_size, t.shape)
    _require(strategy == "channel", f"its block size {list(t.block_size)} is not per row")
    acts = None
    if t.act_quant_kwargs is not None:
        kw = t.act_quant_kwargs
        _require(type(kw.granularity).__name__ == "PerRow" and kw.mapping_type.name == "SYMMETRIC"
                 and not kw.reduce_range, "its activation quantization is not symmetric per token")
        acts = INT8_TOKEN
    return Codes(_int_args(8, "channel", None, True), acts, t.qdata, t.scale, shape=tuple(t.shape), dtype=t.dtype)


def _float8(t: torch.Tensor, packer: str | None) -> Codes:
    _require(t.qdata.dtype == torch.float8_e4m3fn, f"its codes are {t.qdata.dtype}; compressed-tensors' float8 is e4m3fn")
    block = list(t.block_size)
    weights = dict(num_bits=8, type="float", symmetric=True, dynamic=False)
    if block[0] > 1 and block != list(t.shape):  # 2-D blocks: compressed-tensors' block strategy (FP8_BLOCK)
        weights.update(strategy="block", block_structure=block)
        scale = t.scale
    else:
        strategy, _ = _group(t.block_size, t.shape)
        _require(strategy in ("channel", "tensor"), f"its block size {block} is not per row, per tensor or 2-D")
        weights["strategy"] = strategy
        scale = t.scale.reshape(-1, 1) if strategy == "channel" else t.scale.reshape(1)
    acts = None
    if t.act_quant_kwargs is not None:
        granularity = t.act_quant_kwargs.granularity
        kind = type(granularity).__name__
        _require(t.act_quant_kwargs.float8_dtype == torch.float8_e4m3fn, "its activations are not float8 e4m3fn")
        acts = {"PerRow": FP8_TOKEN, "PerTensor": FP8_TENSOR_DYN}.get(kind)
        _require(acts is not None, f"its activation granularity {granularity} has no counterpart")
    return Codes(weights, acts, t.qdata, scale, shape=tuple(t.shape), dtype=t.dtype)


def _intx(t: torch.Tensor, packer: str | None) -> Codes:
    bits = int(str(t.target_dtype).removeprefix("torch.int"))
    strategy, group = _group(t.block_size, t.shape)
    _require(strategy in ("channel", "group"), f"its block size {list(t.block_size)} is not per-row groups")
    zp = t.zero_point
    _require(not zp.dtype.is_floating_point or torch.equal(zp, zp.round()), "its zero points are not integers")
    zp = zp.to(torch.int32)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    _require(bool(((zp >= lo) & (zp <= hi)).all()), f"its zero points leave the int{bits} range")
    symmetric = not zp.any()
    acts = None
    if t.activation_quantization is not None:
        _require(str(getattr(t.activation_quantization, "value", t.activation_quantization)) == "int8_asym_per_token",
                 f"its activation quantization {t.activation_quantization} has no counterpart")
        acts = INT8_TOKEN_ASYM
    return Codes(_int_args(bits, strategy, group, symmetric), acts, t.qdata, t.scale.reshape(t.shape[0], -1),
                 None if symmetric else zp.to(torch.int8).reshape(t.shape[0], -1), shape=tuple(t.shape), dtype=t.dtype)


def int4_from_float_zero(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                         shape: tuple[int, int], dtype: torch.dtype) -> Codes:
    """tinygemm-form int4 (w = (q - 8) * scale + zero, q unsigned 0..15, scale/zero [N, G]) as compressed-tensors
    int4 codes, exact where zero / scale is an integer m (then w = (q - 8 + m) * scale, zero point -m)."""
    m = zero.float() / scale.float()
    _require(bool(torch.isfinite(m).all()) and torch.equal(m, m.round()),
             "its zero points are floating point and zero / scale is not an integer "
             "(torchao's default Int4WeightOnlyConfig layouts)")
    zp = -m.to(torch.int32)
    _require(bool(((zp >= -8) & (zp <= 7)).all()), "zero / scale leaves the int4 zero-point range [-8, 7]")
    symmetric = not zp.any()
    strategy, g = ("channel", None) if group >= shape[1] else ("group", group)
    codes = (values.to(torch.int16) - INT4_MID).to(torch.int8)
    return Codes(_int_args(4, strategy, g, symmetric), None, codes, scale,
                 None if symmetric else zp.to(torch.int8), shape=shape, dtype=dtype)


def _canonical(t: torch.Tensor, packer: str | None) -> Int4Canonical:
    """A device-packed int4 tensor in the canonical form, through its registry row's converter."""
    flat = codec.flatten("", t)
    return tensor_type_of(t, "").relayout.to_canonical(flat.parts, flat.attrs, packer or "")


def _int4_canonical(t: torch.Tensor, packer: str | None) -> Codes:
    canon = _canonical(t, packer)
    _require(getattr(t, "act_pre_scale", None) is None, "it has an activation pre-scale")
    sz = canon.scale_and_zero.transpose(0, 1)  # [N, G, 2]
    _require(canon.shape[1] % canon.group_size == 0, "its input size is not a multiple of the group size")
    return int4_from_float_zero(canon.values, sz[..., 0].contiguous(), sz[..., 1].contiguous(), canon.group_size,
                                canon.shape, canon.dtype)


def _int4_plain(t: torch.Tensor, packer: str | None) -> Codes:
    _require(getattr(t, "act_pre_scale", None) is None, "it has an activation pre-scale")
    signed = bytes_to_nibbles(t.qdata.view(torch.uint8)).view(t.shape)
    values = (signed + INT4_MID) & 0x0F  # signed q -> tinygemm's unsigned q (q_u = q_s + 8)
    group = t.block_size[-1]
    return int4_from_float_zero(values, t.scale.T.contiguous(), t.zero_point.T.contiguous(), group, tuple(t.shape),
                                t.dtype)


def _int4_xpu(t: torch.Tensor, packer: str | None) -> Codes:
    _require(getattr(t, "act_pre_scale", None) is None, "it has an activation pre-scale")
    _require(not t.zero_point.is_floating_point(), "its zero points are floating point (the NPU variant)")
    n, k = t.shape
    unsigned = bytes_to_nibbles(t.qdata.contiguous().view(torch.uint8)).view(n, k)
    zp = t.zero_point.T.to(torch.int16) - INT4_MID  # w = (q_u - zp) * s = (q_s - (zp - 8)) * s
    _require(bool(((zp >= -8) & (zp <= 7)).all()), "its zero points leave the int4 range")
    symmetric = not zp.any()
    group = t.block_size[-1]
    strategy, g = ("channel", None) if group >= k else ("group", group)
    return Codes(_int_args(4, strategy, g, symmetric), None, (unsigned.to(torch.int16) - INT4_MID).to(torch.int8),
                 t.scale.T.contiguous(), None if symmetric else zp.to(torch.int8).contiguous(), shape=(n, k),
                 dtype=t.dtype)


def _nvfp4(t: torch.Tensor, packer: str | None) -> Codes:
    _require(t.block_size == 16 and t.qdata.dim() == 2 and t.qdata.is_contiguous(),
             "its codes are not row-major 2-D blocks of 16")
    _require(t.act_quant_kwargs is None and t.act_per_tensor_scale is None,
             "it quantizes activations too (NVFP4 activations need a calibrated global scale)")
    scale = t.scale
    if t.is_swizzled_scales:
        from torchao.prototype.mx_formats.utils import from_blocked

        scale = from_blocked(scale, t.shape[0], t.shape[1] // 16).view(t.shape[0], -1)
    c = Codes(NVFP4_WEIGHTS, None, t.qdata, scale.contiguous(), global_scale=torch.ones(1, dtype=torch.float32),
              shape=tuple(t.shape), dtype=t.dtype)
    if t.per_tensor_scale is not None:
        c.global_scale = _divisor_for(t.per_tensor_scale.float().reshape(()), c, t.dequantize())
    return c


def _divisor_for(p: torch.Tensor, c: Codes, want: torch.Tensor) -> torch.Tensor:
    """A float32 global scale g (a divisor in compressed-tensors, where torchao multiplies by its per-tensor
    scale p) near 1 / p whose compressed-tensors decompression equals torchao's dequantize() `want` bit for bit;
    refused where none within 4 ulps does (the scale products round differently for some block scale)."""
    def same(g: torch.Tensor) -> bool:
        c.global_scale = g.reshape(1)
        got = ct_format.decompress(ct_format.to_parts(c, NVFP4_FORMAT), ct_format.scheme(c), NVFP4_FORMAT)
        return torch.equal(got.to(want.dtype), want)

    g = nearby(1.0 / p, same)
    if g is None:
        raise Refused(f"no float32 global scale makes compressed-tensors' decompression equal torchao's for its "
                      f"per-tensor scale {p.item():.9g}")
    return g.reshape(1)


def nvfp4_nearest(t: torch.Tensor) -> Codes:
    """NVFP4 codes with the global scale fp32(1 / per_tensor_scale), for a lossy export where none is exact."""
    c = _nvfp4(_Unscaled(t), None)
    c.global_scale = (1.0 / t.per_tensor_scale.float()).reshape(1)
    return c


class _Unscaled:
    """An NVFP4 tensor seen without its per-tensor scale (every other attribute passes through)."""

    def __init__(self, t: torch.Tensor):
        self._t = t
        self.per_tensor_scale = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


def nearby(start: torch.Tensor, ok: Any) -> torch.Tensor | None:
    """The float32 within 4 ulps of `start` (nearest first) that satisfies `ok`, or None."""
    as_int = start.float().reshape(()).view(torch.int32)
    for step in (0, 1, -1, 2, -2, 3, -3, 4, -4):
        candidate = (as_int + step).view(torch.float32)
        if ok(candidate):
            return candidate
    return None


def _mx(t: torch.Tensor, packer: str | None) -> Codes:
    _require(t.elem_dtype == torch.float4_e2m1fn_x2, f"its elements are {t.elem_dtype}; only MXFP4 maps "
             "(compressed-tensors' mxfp8 format is not written by aockpt)")
    _require(t.block_size == 32 and not t.is_swizzled_scales and t.qdata.is_contiguous(),
             "its scales are swizzled or its codes are not row-major blocks of 32")
    _require(t.act_quant_kwargs is None, "it quantizes activations too")
    scale = t.scale.view(torch.uint8) if t.scale.dtype == torch.float8_e8m0fnu else t.scale
    _require(not bool((scale == 255).any()), "a block scale is NaN (E8M0 255)")
    return Codes(MXFP4_WEIGHTS, None, t.qdata.view(torch.uint8), scale.reshape(t.shape[0], -1),
                 shape=tuple(t.shape), dtype=t.dtype)


def reference(t: torch.Tensor, packer: str | None) -> torch.Tensor:
    """torchao's dequantized weight; for int4 layouts torchao cannot dequantize on this device, the same math
    (tinygemm's (q - 8) * scale + zero, XPU's (q - zero) * scale) through aockpt's exact canonical forms."""
    name = type(t).__name__
    if name in ("Int4TilePackedTo4dTensor", "Int4OpaqueTensor"):
        return dequantize(_canonical(t, packer))
    if name == "Int4PlainInt32Tensor":
        codes = bytes_to_nibbles(t.qdata.contiguous().view(torch.uint8)).view(t.shape)
        return xpu._xpu_dequantize(codes, t.scale, t.zero_point, t.block_size[-1])
    if name == "Int4Tensor":
        q = bytes_to_nibbles(t.qdata.view(torch.uint8)).view(t.shape).to(torch.int16)
        q = torch.where(q >= 8, q - 16, q).to(torch.float32)
        g = t.block_size[-1]
        scale, zero = (p.float().T.repeat_interleave(g, 1) for p in (t.scale, t.zero_point))
        return (q * scale + zero).to(t.dtype)
    return t.dequantize()


def bits_and_group(t: torch.Tensor) -> tuple[str, int, int | None]:
    """(type, bits, group size or None for per row) a lossy export re-quantizes a weight to."""
    name, k = type(t).__name__, t.shape[1]
    if name == "Float8Tensor":
        return "float", 8, None
    if name == "Int8Tensor":
        return "int", 8, None
    if name == "IntxUnpackedToInt8Tensor":
        group = t.block_size[-1]
        return "int", int(str(t.target_dtype).removeprefix("torch.int")), None if group >= k else group
    group = t.block_size[-1]
    return "int", 4, None if group >= k else group


READERS = {
    "Int8Tensor": _int8,
    "Float8Tensor": _float8,
    "IntxUnpackedToInt8Tensor": _intx,
    "Int4TilePackedTo4dTensor": _int4_canonical,
    "Int4OpaqueTensor": _int4_canonical,
    "Int4PlainInt32Tensor": _int4_xpu,
    "Int4Tensor": _int4_plain,
    "MXTensor": _mx,
    "NVFP4Tensor": _nvfp4,
}
