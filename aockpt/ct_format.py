"""compressed-tensors' on-disk parts of one weight, written and read through compressed-tensors itself.

The format of a scheme is the one compressed-tensors infers for a Linear (``infer_module_format``), packing
is its ``pack_to_int32`` / ``unpack_from_int32``, decompression is its compressor's ``decompress``: aockpt
only moves codes and scales between the two libraries' tensors. compressed-tensors is an optional
dependency (``pip install aockpt[serving]``), imported when one of these functions runs.
"""

from __future__ import annotations

from typing import Any

import torch

from .ct_codes import Codes
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
    weights = {k: w[k] for k in ("num_bits", "type", "symmetric", "strategy", "dynamic", "group_size", "scale_dtype")
               if k in w}
    acts = None
    if s.input_activations is not None:
        a = s.input_activations.model_dump(mode="json", exclude_none=True)
        acts = {k: a[k] for k in ("num_bits", "type", "symmetric", "strategy", "dynamic") if k in a}
    return weights, acts


def from_parts(parts: dict[str, torch.Tensor], s: Any, fmt: str, dtype: torch.dtype, where: str) -> Codes:
    """A stored compressed-tensors weight as codes (the inverse of ``to_parts``)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    weights, acts = args_of(s)
    w = weights
    scale, zp, glob = parts["weight_scale"], parts.get("weight_zero_point"), parts.get("weight_global_scale")
    if PACKED not in parts:
        codes = parts["weight"]
    elif fmt == "pack-quantized":
        shape = [int(v) for v in parts["weight_shape"].tolist()]
        codes = unpack_from_int32(parts[PACKED], w["num_bits"], torch.Size(shape))
        if zp is not None:
            zp = unpack_from_int32(zp, w["num_bits"], torch.Size([shape[0], scale.shape[-1]]), packed_dim=0)
    else:
        codes = parts[PACKED]
    shape = tuple(int(v) for v in parts["weight_shape"].tolist()) if "weight_shape" in parts else \
        (codes.shape[0], codes.shape[1] * (2 if codes.dtype == torch.uint8 and w["num_bits"] == 4 else 1))
    if len(shape) != 2:
        raise CorruptCheckpointError(f"{where}: weight shape {shape} is not 2-D")
    return Codes(weights, acts, codes, scale, zp, glob, shape, dtype)


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
