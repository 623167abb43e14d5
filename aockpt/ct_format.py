"""compressed-tensors' on-disk parts of one weight, written and read through compressed-tensors itself.

The format of a scheme is the one compressed-tensors infers for a Linear (``infer_module_format``), packing
is its ``pack_to_int32`` / ``unpack_from_int32``, decompression is its compressor's ``decompress``: aockpt
only moves codes and scales between the two libraries' tensors. compressed-tensors is an optional
dependency (``pip install aockpt[serving]``), imported when one of these functions runs.
"""

from __future__ import annotations

from typing import Any

import torch

from .ct_record import Codes
from .errors import CorruptCheckpointError, UsageError

PACKED = "weight_packed"
INSTALL = "pip install 'aockpt[serving]' (compressed-tensors>=0.20)"


def ct() -> Any:
    """The compressed_tensors package, or a UsageError saying how to install it."""
    try:
        import compressed_tensors
        import compressed_tensors.compressors  # noqa: F401  (registers the compressors)
    except ImportError as e:
        raise UsageError(f"compressed-tensors is not installed; {INSTALL}") from e
    return compressed_tensors


def scheme(c: Codes, targets: list[str] | None = None) -> Any:
    """The compressed-tensors QuantizationScheme of a weight (targets filled in by the caller)."""
    q = ct().quantization
    acts = q.QuantizationArgs(**c.input_activations) if c.input_activations else None
    return q.QuantizationScheme(targets=targets or ["Linear"], weights=q.QuantizationArgs(**c.weights),
                                input_activations=acts)


def format_of(s: Any) -> str:
    """The compressed-tensors format compressed-tensors itself picks for a Linear with this scheme."""
    from compressed_tensors.compressors.format import infer_module_format

    return infer_module_format(torch.nn.Linear, s).value


def to_parts(c: Codes, fmt: str) -> dict[str, torch.Tensor]:
    """The weight's parts under compressed-tensors' local names (weight / weight_packed, weight_scale, ...)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    parts: dict[str, torch.Tensor] = {"weight_scale": c.scale.contiguous()}
    if fmt in ("naive-quantized", "int-quantized", "float-quantized"):
        parts["weight"] = c.codes.contiguous()
        if c.zero_point is not None:
            parts["weight_zero_point"] = c.zero_point.contiguous()
    elif fmt == "pack-quantized":
        bits = c.weights["num_bits"]
        parts[PACKED] = pack_to_int32(c.codes.contiguous(), bits)
        parts["weight_shape"] = torch.tensor(c.shape)
        if c.zero_point is not None:
            parts["weight_zero_point"] = pack_to_int32(c.zero_point.contiguous(), bits, packed_dim=0).contiguous()
    elif fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        parts[PACKED] = c.codes.contiguous()
        if c.global_scale is not None:
            parts["weight_global_scale"] = c.global_scale.contiguous()
    else:
        raise UsageError(f"compressed-tensors format {fmt!r} is not one aockpt writes")
    return parts


def param_names(s: Any, fmt: str) -> tuple[str, ...]:
    """The parameter names compressed-tensors' compressor stores for this scheme and format."""
    from compressed_tensors.compressors import BaseCompressor

    return tuple(BaseCompressor.get_value_from_registry(fmt).compression_param_names(s))


def decompress(parts: dict[str, torch.Tensor], s: Any, fmt: str) -> torch.Tensor:
    """compressed-tensors' own decompression of one weight's parts (its compressor's ``decompress``)."""
    from compressed_tensors.compressors import BaseCompressor

    return BaseCompressor.get_value_from_registry(fmt).decompress(dict(parts), s)["weight"]


def args_of(s: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A scheme's (weight args, input activation args) as the plain dicts ``Codes`` holds."""
    w = s.weights.model_dump(mode="json", exclude_none=True)
    weights = {k: w[k] for k in ("num_bits", "type", "symmetric", "strategy", "dynamic", "group_size", "block_structure",
                                 "scale_dtype") if k in w}
    acts = None
    if s.input_activations is not None:
        a = s.input_activations.model_dump(mode="json", exclude_none=True)
        acts = {k: a[k] for k in ("num_bits", "type", "symmetric", "strategy", "dynamic", "group_size") if k in a}
    return weights, acts


def from_parts(parts: dict[str, torch.Tensor], s: Any, fmt: str, dtype: torch.dtype, where: str) -> Codes:
    """A stored compressed-tensors weight as codes (the inverse of ``to_parts``), every part's dtype and shape
    checked against the scheme before anything is unpacked."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    weights, acts = args_of(s)
    bits = weights["num_bits"]
    scale, zp, glob = parts["weight_scale"], parts.get("weight_zero_point"), parts.get("weight_global_scale")
    shape = _shape(parts, bits, where)
    expected = {"weight_scale": _scale_shape(weights, shape, where)}
    if PACKED in parts:
        expected[PACKED] = (shape[0], -(-shape[1] * bits // 32)) if fmt == "pack-quantized" else (shape[0], shape[1] // 2)
    else:
        expected["weight"] = shape
    if glob is not None:
        expected["weight_global_scale"] = (1,)
    for name, want in expected.items():
        if tuple(parts[name].shape) != tuple(want):
            raise CorruptCheckpointError(f"{where}: {name} has shape {tuple(parts[name].shape)}, expected {tuple(want)} "
                                         f"for a {shape[0]}x{shape[1]} weight of this scheme; the file is corrupt")
    if PACKED not in parts:
        codes = parts["weight"]
    elif fmt == "pack-quantized":
        _require_dtype(parts[PACKED], torch.int32, PACKED, where)
        codes = unpack_from_int32(parts[PACKED], bits, torch.Size(shape))
        if zp is not None:
            _require_dtype(zp, torch.int32, "weight_zero_point", where)
            if tuple(zp.shape) != (-(-shape[0] * bits // 32), scale.shape[-1]):
                raise CorruptCheckpointError(f"{where}: weight_zero_point has shape {tuple(zp.shape)}, which does "
                                             f"not pack {shape[0]}x{scale.shape[-1]} zero points; the file is corrupt")
            zp = unpack_from_int32(zp, bits, torch.Size([shape[0], scale.shape[-1]]), packed_dim=0)
    else:
        _require_dtype(parts[PACKED], torch.uint8, PACKED, where)
        codes = parts[PACKED]
    return Codes(weights, acts, codes, scale, zp, glob, shape, dtype)


def _shape(parts: dict[str, torch.Tensor], bits: int, where: str) -> tuple[int, int]:
    """The weight's [out, in] size: weight_shape where stored, else the codes' (fp4: two per byte)."""
    if "weight_shape" in parts:
        stored = parts["weight_shape"]
        if stored.dtype.is_floating_point or stored.numel() != 2 or bool((stored <= 0).any()):
            raise CorruptCheckpointError(f"{where}: weight_shape {stored.tolist()} is not two positive integers")
        return tuple(int(v) for v in stored.tolist())
    codes = parts[PACKED] if PACKED in parts else parts["weight"]
    if codes.dim() != 2:
        raise CorruptCheckpointError(f"{where}: stored codes have shape {tuple(codes.shape)}, not 2-D")
    return codes.shape[0], codes.shape[1] * (2 if PACKED in parts and bits == 4 else 1)


def _scale_shape(weights: dict[str, Any], shape: tuple[int, int], where: str) -> tuple[int, ...]:
    """The scale shape compressed-tensors stores for a strategy."""
    n, k = shape
    strategy, group = weights["strategy"], weights.get("group_size")
    if strategy == "channel":
        return (n, 1)
    if strategy == "tensor":
        return (1,)
    if strategy == "block" and len(weights.get("block_structure") or ()) == 2:
        bn, bk = weights["block_structure"]
        return (-(-n // bn), -(-k // bk))
    if strategy in ("group", "tensor_group") and group and k % group == 0:
        return (n, k // group)
    raise CorruptCheckpointError(f"{where}: strategy {strategy} with group size {group} does not fit a {n}x{k} weight")


def _require_dtype(t: torch.Tensor, dtype: torch.dtype, name: str, where: str) -> None:
    if t.dtype != dtype:
        raise CorruptCheckpointError(f"{where}: {name} is {t.dtype}, expected {dtype}; the file is corrupt")


def requantized(weight: torch.Tensor, kind: str, bits: int, group: int | None, dtype: torch.dtype) -> Codes:
    """`weight` quantized symmetric per row or per group by compressed-tensors' own rules (min/max qparams,
    its quantize), scales kept in `dtype`: what a lossy export writes where no exact counterpart exists."""
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    n, k = weight.shape
    strategy = "group" if group else "channel"
    weights = dict(num_bits=bits, type=kind, symmetric=True, strategy=strategy, dynamic=False)
    if group:
        weights["group_size"] = group
    args = ct().quantization.QuantizationArgs(**weights)
    w = weight.to(dtype)
    blocks = w.float().view(n, -1, group or k)
    scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args)
    scale = scale.to(dtype)
    codes = quantize(x=w, scale=scale, zero_point=None, args=args,
                     dtype=torch.int8 if kind == "int" else torch.float8_e4m3fn)
    return Codes(weights, None, codes, scale, shape=(n, k), dtype=dtype)
