"""Serving facts per registry row: what compressed-tensors export does with each torchao type, and what vLLM's
torchao path does with it. One table keyed by the registry's own row objects; docs/serving.md's table is
rendered from it (``python -m aockpt.ct_table``) and tests/test_serving.py checks the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import ct_codes
from .ct_format import args_of
from .ct_torchao import target_type
from .errors import UnsupportedTensorError
from .registry import PLAIN, TENSOR_TYPES, TensorType


IMPORTED_FORMATS = frozenset({"naive-quantized", "int-quantized", "float-quantized", "pack-quantized",
                              "nvfp4-pack-quantized", "mxfp4-pack-quantized"})


def formats(qc: dict) -> set:
    """Every format a compressed-tensors quantization_config stores weights in (per group where groups say);
    anything not a string (a hostile config) counts as a format aockpt does not import."""
    groups = qc.get("config_groups")
    named = {g.get("format") for g in groups.values() if isinstance(g, dict) and g.get("format")} \
        if isinstance(groups, dict) else set()
    found = named or {qc.get("format")}
    return {f if isinstance(f, str) else repr(f) for f in found}


def imports(qc: dict) -> bool:
    """Whether aockpt's importer (ct_source) converts a compressed-tensors quantization_config: stored compressed,
    every format in IMPORTED_FORMATS and every group's scheme one ct_torchao builds. aockpt.foreign lets exactly
    these through its refusal, so a folder the importer would refuse is described, not half-read."""
    groups = qc.get("config_groups")
    return qc.get("quantization_status", "compressed") == "compressed" and formats(qc) <= IMPORTED_FORMATS and \
        isinstance(groups, dict) and all(_builds(g) for g in groups.values())


def _builds(group: object) -> bool:
    """Whether one config group's scheme, validated by compressed-tensors itself, has a torchao counterpart."""
    try:
        from compressed_tensors.quantization import QuantizationScheme
        from pydantic import ValidationError
    except ImportError:  # without compressed-tensors there is no import; foreign says what reads the folder
        return False
    try:
        target_type(*args_of(QuantizationScheme.model_validate(group)), "")
    except (ValidationError, UnsupportedTensorError):
        return False
    return True


@dataclass(frozen=True)
class Mapping:
    """How one torchao type leaves for compressed-tensors, and how it fares in vLLM's torchao loader."""

    target: str  # compressed-tensors format and scheme it becomes
    exact: str  # "always", the condition under which it is exact, or "never"
    read: Callable | None  # ct_codes reader (torchao tensor, packer) -> Codes, raising ct_codes.Refused
    lossy: str | None = None  # what --lossy writes where the tensor has no exact counterpart; None: still refused
    # vLLM's torchao path narrows and copy_s into a subclass it makes from the config: measured here with
    # torchao 0.18 on CPU (tests/test_serving.py re-measures it); fused qkv/gate_up need row narrowing even at TP=1
    slices: bool = False


_INT4 = "pack-quantized, int4 group (W4A16; asymmetric where zero point != 0)"
_INT4_EXACT = "zero / scale is an integer in [-8, 7] for every group (0: symmetric)"
_REQUANT = "re-quantized symmetric per group with compressed-tensors' own rules (absmax scale), error stated"

MAPPINGS: dict[TensorType, Mapping] = {
    PLAIN: Mapping("dense (unquantized modules, norms, embeddings carry over)", "always", None, "not needed",
                   slices=True),
    TENSOR_TYPES["Int8Tensor"]: Mapping(
        "pack-quantized int8 channel (W8A16); int-quantized with dynamic token int8 activations (W8A8)",
        "symmetric per-row weights (zero point 0), no static activation scale", ct_codes.READERS["Int8Tensor"],
        "re-quantized symmetric per row, error stated", slices=True),
    TENSOR_TYPES["Float8Tensor"]: Mapping(
        "naive-quantized FP8 channel/tensor/block (weight-only); float-quantized FP8_DYNAMIC (token or tensor "
        "activations)", "e4m3fn codes; per-row, per-tensor or 2-D block scales; activations per token or tensor",
        ct_codes.READERS["Float8Tensor"],
        "re-quantized to e4m3fn per row, error stated", slices=True),
    TENSOR_TYPES["IntxUnpackedToInt8Tensor"]: Mapping(
        "pack-quantized intN group/channel (WNA16); int-quantized with int8 asymmetric token activations",
        "integer zero points in range (0: symmetric)", ct_codes.READERS["IntxUnpackedToInt8Tensor"], _REQUANT,
        slices=True),
    TENSOR_TYPES["Int4TilePackedTo4dTensor"]: Mapping(_INT4, _INT4_EXACT, ct_codes.READERS["Int4TilePackedTo4dTensor"],
                                                       _REQUANT, slices=True),
    TENSOR_TYPES["Int4OpaqueTensor"]: Mapping(_INT4, _INT4_EXACT, ct_codes.READERS["Int4OpaqueTensor"], _REQUANT),
    TENSOR_TYPES["Int4Tensor"]: Mapping(_INT4, _INT4_EXACT, ct_codes.READERS["Int4Tensor"], _REQUANT, slices=True),
    TENSOR_TYPES["Int4PreshuffledTensor"]: Mapping("none", "never (its shuffle is not known to aockpt)", None),
    TENSOR_TYPES["Int4PlainInt32Tensor"]: Mapping(
        _INT4, "integer zero points in [0, 15] (XPU); never for the NPU float zero point",
        ct_codes.READERS["Int4PlainInt32Tensor"], _REQUANT),
    TENSOR_TYPES["MXTensor"]: Mapping(
        "mxfp4-pack-quantized (MXFP4A16)", "fp4 elements, blocks of 32, unswizzled, weight-only",
        ct_codes.READERS["MXTensor"], None, slices=True),
    TENSOR_TYPES["NVFP4Tensor"]: Mapping(
        "nvfp4-pack-quantized (NVFP4A16)",
        "weight-only, and a float32 global scale within 4 ulps of 1 / per_tensor_scale makes both libraries' "
        "dequantized weights bit-identical (checked per tensor; no per-tensor scale: global scale 1)",
        ct_codes.READERS["NVFP4Tensor"], "global scale 1 / per_tensor_scale, error stated", slices=True),
    TENSOR_TYPES["NF4Tensor"]: Mapping("none", "never (compressed-tensors has no NF4 format)", None),
}


_UNMAPPED = Mapping("none", "never (no serving mapping for this type yet)", None)


def mapping(row: TensorType) -> Mapping:
    """The serving facts of a registry row (a row added without them exports nothing, and says so)."""
    return MAPPINGS.get(row, _UNMAPPED)


def vllm_text(row: TensorType, tensor: torch.Tensor | None = None) -> str:
    """What vLLM's torchao path (``quant_method: torchao``) does with a weight of this type (and, given the
    tensor, whether torchao has a config that makes it), read from vLLM's source."""
    if not row.quantized:
        return "loads (unquantized)"
    if not row.stock_loadable or row.config is None or (tensor is not None and row.config(tensor) is None):
        return "refuses: torchao's safetensors reader or no torchao config makes this tensor"
    if not mapping(row).slices:
        return "fails: no aten.slice/copy_ for the narrowing its weight loader does (fused qkv/gate_up, TP)"
    return f"loads; runs on torchao's {'/'.join(sorted(row.kernels))} kernels; every rank reads whole shards"


_HEADER = ("| torchao type | compressed-tensors format and scheme | exact when | --lossy | vLLM torchao path |\n"
           "|---|---|---|---|---|")


def markdown() -> str:
    """The mapping table of docs/serving.md, one line per registry row (the plain tensor last)."""
    rows = [*TENSOR_TYPES.values(), PLAIN]
    lines = [f"| {r.name} | {mapping(r).target} | {mapping(r).exact} | {mapping(r).lossy or 'refused'} "
             f"| {vllm_text(r)} |" for r in rows]
    return "\n".join([_HEADER, *lines])


if __name__ == "__main__":
    print(markdown())
