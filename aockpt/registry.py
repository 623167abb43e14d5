"""The one table of torchao tensor types and attribute value types that aockpt knows.

Everything that depends on a tensor's type (flatten/rebuild, the unpickling allowlist, portability
checks, ``inspect``, the docs and the parametrized tests) reads ``TENSOR_TYPES``; a new torchao type is
one entry here. On-disk names are stable strings chosen by us (equal to torchao's own ``_type`` names
so that stock torchao/transformers can read the files), never ``cls.__name__`` read at run time.
"""

from __future__ import annotations

import enum
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import UnsupportedTensorError


def _quiet_torchao_import() -> None:
    """Import torchao once without its optional-kernel load warnings reaching users."""
    for name in ("torchao", "torchao.quantization", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchao.quantization  # noqa: F401


_quiet_torchao_import()

from torchao.float8.inference import Float8MMConfig  # noqa: E402
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402
from torchao.prototype.mx_formats.mx_tensor import MXTensor, QuantizeTensorToMXKwargs  # noqa: E402
from torchao.prototype.mx_formats.nvfp4_tensor import (  # noqa: E402
    NVFP4Tensor,
    QuantizeTensorToNVFP4Kwargs,
)
from torchao.prototype.quantization.int4 import Int4OpaqueTensor  # noqa: E402
from torchao.quantization import (  # noqa: E402
    Float8DynamicActivationFloat8WeightConfig,
    Float8Tensor,
    Float8WeightOnlyConfig,
    Int4PlainInt32Tensor,
    Int4PreshuffledTensor,
    Int4Tensor,
    Int4TilePackedTo4dTensor,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8DynamicActivationIntxWeightConfig,
    Int8Tensor,
    Int8WeightOnlyConfig,
    IntxUnpackedToInt8Tensor,
    IntxWeightOnlyConfig,
    MappingType,
)
from torchao.quantization import granularity as _g  # noqa: E402
from torchao.quantization.quant_primitives import ZeroPointDomain  # noqa: E402
from torchao.quantization.quantize_.common import KernelPreference  # noqa: E402
from torchao.quantization.quantize_.workflows import (  # noqa: E402
    QuantizeTensorToFloat8Kwargs,
    QuantizeTensorToInt8Kwargs,
)
from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (  # noqa: E402
    IntxUnpackedToInt8TensorActivationQuantization,
)
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import (  # noqa: E402
    NF4Tensor,
    SubclassTensorArgs,
)


class Portability(str, enum.Enum):
    """Whether a tensor's bytes mean the same thing on every device."""

    PORTABLE = "portable"  # plain layout: moving the bytes to another device is exact
    PINNED = "pinned"  # packed for one device's kernel: another device needs a re-layout


class Along(str, enum.Enum):
    """How a part follows one outer dimension when a tensor is split for tensor parallelism."""

    VALUES = "values"  # one stored element per 1, 2 or 8 values (the ratio is read from the shapes)
    BLOCKS = "blocks"  # one stored element per quantization block along that dimension


class TpSplit(str, enum.Enum):
    """How a rank's slice of a tensor is read (see aockpt/tp.py and docs/distributed.md)."""

    DIRECT = "direct"  # only the slice's bytes are read: rows/columns of each part
    RELAYOUT = "relayout"  # device-packed int4: the whole tensor is read, sliced in its exact canonical form, re-packed
    NONE = "none"  # not split: the layout keeps no row/column structure aockpt can cut exactly


# part -> (part dim, how it follows) for outer dim 0 (rows, colwise split) and outer dim 1 (columns, rowwise)
TpAxes = tuple[tuple[str, tuple[int, Along] | None, tuple[int, Along] | None], ...]


@dataclass(frozen=True)
class TensorType:
    """One torchao tensor subclass as aockpt sees it."""

    name: str  # stable on-disk name (torchao's `_type`)
    cls: type
    family: str  # int8 | float8 | int4 | intx | mx | nvfp4 | nf4
    portability: Portability
    packed_for: str | None  # device type whose kernel the bytes are packed for (pinned only)
    kernels: frozenset[str]  # device types where torch/torchao 0.18 has a matmul kernel for it
    stock_loadable: bool  # stock transformers 5 + torchao 0.18 can read it from safetensors
    note: str
    names: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] | None = None  # see inner_names
    tp: tuple[TpSplit, TpSplit] = (TpSplit.NONE, TpSplit.NONE)  # splitting the rows (colwise), the columns (rowwise)
    tp_axes: TpAxes = ()  # for DIRECT: where each part keeps the outer rows and columns
    # part -> dtype names it may be stored as (checked before any constructor or converter reads it);
    # parts not listed are unchecked
    part_dtypes: dict[str, frozenset[str]] = field(default_factory=dict, hash=False, compare=False)
    config: Callable[[Any], Any] | None = None  # tensor -> the torchao 0.18 config that makes it (config.json)
    weights_only: bool = True  # torch.load(weights_only=True) rebuilds it after a plain `import torchao`

    def tp_text(self) -> str:
        """How tensor parallelism splits this type, as `inspect` says it: one word, or rows then columns."""
        rows, cols = self.tp
        return rows.value if rows is cols else f"{rows.value} rows, {cols.value} cols"

    def inner_names(self) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        """(required parts, optional parts, attributes), from torchao's class conventions unless overridden."""
        if self.names is not None:
            return self.names
        cls = self.cls
        return (
            tuple(cls.tensor_data_names),
            tuple(getattr(cls, "optional_tensor_data_names", None) or ()),
            tuple(cls.tensor_attribute_names) + tuple(getattr(cls, "optional_tensor_attribute_names", None) or ()),
        )


def _t(name, cls, family, portability, packed_for, kernels, stock, note, names=None,
       tp=(TpSplit.NONE, TpSplit.NONE), tp_axes=(), config=None, weights_only=True, **dtypes) -> TensorType:
    return TensorType(name, cls, family, portability, packed_for, frozenset(kernels), stock, note, names, tp, tp_axes,
                      {part: frozenset(allowed) for part, allowed in dtypes.items()}, config, weights_only)


def _int8_config(t: Any) -> Any:
    """Int8Tensor: weight-only, or with int8 dynamic activations."""
    return Int8WeightOnlyConfig() if t.act_quant_kwargs is None else Int8DynamicActivationInt8WeightConfig()


def _float8_config(t: Any) -> Any:
    """Float8Tensor: weight-only, or with float8 dynamic activations of the same granularity."""
    if t.act_quant_kwargs is None:
        return Float8WeightOnlyConfig()
    return Float8DynamicActivationFloat8WeightConfig(granularity=t.act_quant_kwargs.granularity)


def _intx_config(t: Any) -> Any:
    """IntxUnpackedToInt8Tensor: its bit width and group, weight-only or with int8 dynamic activations."""
    group = t.block_size[-1]
    granularity = _g.PerAxis(0) if group == t.shape[-1] else _g.PerGroup(group)
    if t.activation_quantization is None:
        return IntxWeightOnlyConfig(weight_dtype=t.target_dtype, granularity=granularity)
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=t.target_dtype, weight_granularity=granularity)


def _int4_config(packing: str) -> Callable[[Any], Any]:
    """An int4 tensor of one packing format: Int4WeightOnlyConfig with its group size."""
    def make(t: Any) -> Any:
        return Int4WeightOnlyConfig(group_size=t.block_size[-1], int4_packing_format=packing)

    return make


# Outer dtypes a quantized tensor dequantizes to, and the dtype names its float parts may take.
OUTER_DTYPES = frozenset({"float32", "bfloat16", "float16"})
_F = tuple(OUTER_DTYPES)
_FP8 = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")


_P, _X = Portability.PORTABLE, Portability.PINNED
_V, _B = Along.VALUES, Along.BLOCKS
_ROW_MAJOR: TpAxes = (("qdata", (0, _V), (1, _V)), ("scale", (0, _B), (1, _B)), ("zero_point", (0, _B), (1, _B)))
_K_MAJOR_SCALES: TpAxes = (("qdata", (0, _V), (1, _V)), ("scale", (1, _B), (0, _B)), ("zero_point", (1, _B), (0, _B)))
_DIRECT, _RELAYOUT = (TpSplit.DIRECT, TpSplit.DIRECT), (TpSplit.RELAYOUT, TpSplit.RELAYOUT)
# tinygemm tiles hold 8 whole rows each (rows cut exactly); columns run through padded K tiles (re-laid out)
_TILE_ROWS: TpAxes = (("qdata", (0, _V), None), ("scale_and_zero", (1, _V), None))

TENSOR_TYPES: dict[str, TensorType] = {
    t.name: t
    for t in (
        _t("Int8Tensor", Int8Tensor, "int8", _P, None, {"cpu", "cuda"}, True,
           "int8 per-row weight, optional int8 dynamic activation", tp=_DIRECT, tp_axes=_ROW_MAJOR,
           qdata=("int8",), scale=_F, zero_point=("int8",), act_quant_scale=_F, act_pre_scale=_F,
           config=_int8_config),
        _t("Float8Tensor", Float8Tensor, "float8", _P, None, {"cpu", "cuda"}, True,
           "float8 weight, optional float8 dynamic activation", tp=_DIRECT, tp_axes=_ROW_MAJOR, qdata=_FP8, scale=_F,
           config=_float8_config),
        _t("IntxUnpackedToInt8Tensor", IntxUnpackedToInt8Tensor, "intx", _P, None, {"cpu", "cuda"}, True,
           "int1..int8 values held unpacked in int8", tp=_DIRECT, tp_axes=_ROW_MAJOR,
           qdata=("int8",), scale=_F, zero_point=("int8", "int32", *_F), config=_intx_config),
        _t("Int4TilePackedTo4dTensor", Int4TilePackedTo4dTensor, "int4", _X, "cuda", {"cuda"}, True,
           "int4 in CUDA tinygemm tile packing",
           tp=(TpSplit.DIRECT, TpSplit.RELAYOUT), tp_axes=_TILE_ROWS, qdata=("int32",), scale_and_zero=_F,
           act_pre_scale=_F, config=_int4_config("tile_packed_to_4d")),
        _t("Int4OpaqueTensor", Int4OpaqueTensor, "int4", _X, "cpu", {"cpu"}, False,
           "int4 in the CPU kernel's ISA-dependent packing", tp=_RELAYOUT,
           qdata=("uint8",), scale_and_zero=_F, act_pre_scale=_F, weights_only=False),
        _t("Int4Tensor", Int4Tensor, "int4", _P, None, {"cuda"}, True,
           "int4 plain nibble packing (mslk kernels)", tp=_DIRECT, tp_axes=_K_MAJOR_SCALES,
           qdata=("int8", "uint8"), scale=_F, zero_point=_F, act_pre_scale=_F, config=_int4_config("plain")),
        _t("Int4PreshuffledTensor", Int4PreshuffledTensor, "int4", _X, "cuda", {"cuda"}, False,
           "int4 preshuffled for mslk CUDA kernels", qdata=("int8", "uint8"), group_scale=_F, group_zero=_F,
           row_scale=_F),
        _t("Int4PlainInt32Tensor", Int4PlainInt32Tensor, "int4", _X, "xpu", {"xpu", "npu"}, True,
           "int4 packed in int32 for XPU/NPU kernels", tp=_DIRECT, tp_axes=_K_MAJOR_SCALES,
           qdata=("int32",), scale=_F, zero_point=("int8", *_F), act_pre_scale=_F,
           config=_int4_config("plain_int32")),
        _t("MXTensor", MXTensor, "mx", _P, None, {"cpu", "cuda"}, True,
           "OCP microscaling (mxfp8/mxfp4) with e8m0 block scales", tp=_DIRECT, tp_axes=_ROW_MAJOR,
           qdata=(*_FP8, "uint8", "float4_e2m1fn_x2"), scale=("float8_e8m0fnu", "uint8"), weights_only=False),
        _t("NVFP4Tensor", NVFP4Tensor, "nvfp4", _P, None, {"cpu", "cuda"}, True,
           "NVIDIA fp4 with float8 block scales", tp=_DIRECT, tp_axes=_ROW_MAJOR,
           qdata=("uint8", "float4_e2m1fn_x2"), scale=("float8_e4m3fn",), per_tensor_scale=_F, act_per_tensor_scale=_F,
           weights_only=False),
        _t("NF4Tensor", NF4Tensor, "nf4", _P, None, {"cpu", "cuda"}, False,
           "QLoRA normal-float 4 with double-quantized scalers",
           (("quantized_data", "scaler_mean", "quantization_factor", "quantized_scalers", "nf4"), (),
            ("block_size", "n_blocks", "scaler_block_size", "tensor_meta")),
           quantized_data=("uint8",), scaler_mean=_F, quantization_factor=_F, quantized_scalers=("int8",), nf4=_F),
    )
}

PLAIN_TENSOR = "Tensor"  # on-disk `_type` of an ordinary torch.Tensor (torchao's convention)

_BY_CLASS: dict[type, TensorType] = {t.cls: t for t in TENSOR_TYPES.values()}


def tensor_type_of(tensor: torch.Tensor, name: str) -> TensorType | None:
    """The registry entry for a tensor, None for a plain tensor; refuses unknown subclasses."""
    cls = type(tensor)
    if cls is torch.Tensor or cls is torch.nn.Parameter:
        return None
    entry = _BY_CLASS.get(cls)
    if entry is None:
        known = ", ".join(TENSOR_TYPES)
        raise UnsupportedTensorError(
            f"{name} is a {cls.__module__}.{cls.__qualname__}, which aockpt has no codec for; "
            f"supported types: {known}"
        )
    return entry


def tensor_type_named(type_name: str, where: str) -> TensorType:
    """The registry entry for an on-disk type name; a name outside the table is refused."""
    entry = TENSOR_TYPES.get(type_name) if isinstance(type_name, str) else None
    if entry is None:
        raise UnsupportedTensorError(
            f"{where} has tensor type {type_name!r}, which is not in aockpt's allowlist "
            f"({', '.join(TENSOR_TYPES)}); upgrade aockpt or re-export the checkpoint"
        )
    return entry


# Attribute values: the only classes a JSON record may name, keyed by stable on-disk names.
VALUE_TYPES: dict[str, type] = {
    "MappingType": MappingType,
    "KernelPreference": KernelPreference,
    "ScaleCalculationMode": ScaleCalculationMode,
    "ZeroPointDomain": ZeroPointDomain,
    "IntxUnpackedToInt8TensorActivationQuantization": IntxUnpackedToInt8TensorActivationQuantization,
    "PerRow": _g.PerRow,
    "PerTensor": _g.PerTensor,
    "PerGroup": _g.PerGroup,
    "PerAxis": _g.PerAxis,
    "PerBlock": _g.PerBlock,
    "PerToken": _g.PerToken,
    "QuantizeTensorToInt8Kwargs": QuantizeTensorToInt8Kwargs,
    "QuantizeTensorToFloat8Kwargs": QuantizeTensorToFloat8Kwargs,
    "QuantizeTensorToMXKwargs": QuantizeTensorToMXKwargs,
    "QuantizeTensorToNVFP4Kwargs": QuantizeTensorToNVFP4Kwargs,
    "Float8MMConfig": Float8MMConfig,
    "SubclassTensorArgs": SubclassTensorArgs,
}

VALUE_TYPE_NAMES: dict[type, str] = {cls: name for name, cls in VALUE_TYPES.items()}

# dtypes by stable name; the safetensors code is None where safetensors has no code for it.
DTYPES: dict[str, tuple[torch.dtype, str | None]] = {
    "float64": (torch.float64, "F64"),
    "float32": (torch.float32, "F32"),
    "float16": (torch.float16, "F16"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "int64": (torch.int64, "I64"),
    "int32": (torch.int32, "I32"),
    "int16": (torch.int16, "I16"),
    "int8": (torch.int8, "I8"),
    "uint64": (torch.uint64, "U64"),
    "uint32": (torch.uint32, "U32"),
    "uint16": (torch.uint16, "U16"),
    "uint8": (torch.uint8, "U8"),
    "bool": (torch.bool, "BOOL"),
    "float8_e4m3fn": (torch.float8_e4m3fn, "F8_E4M3"),
    "float8_e5m2": (torch.float8_e5m2, "F8_E5M2"),
    "float8_e4m3fnuz": (torch.float8_e4m3fnuz, "F8_E4M3FNUZ"),
    "float8_e5m2fnuz": (torch.float8_e5m2fnuz, "F8_E5M2FNUZ"),
    "float8_e8m0fnu": (torch.float8_e8m0fnu, "F8_E8M0"),
    "float4_e2m1fn_x2": (torch.float4_e2m1fn_x2, "F4"),
    "complex64": (torch.complex64, "C64"),
    **{f"int{b}": (getattr(torch, f"int{b}"), None) for b in range(1, 8)},
    **{f"uint{b}": (getattr(torch, f"uint{b}"), None) for b in range(1, 8)},
}

DTYPE_NAMES: dict[torch.dtype, str] = {dt: name for name, (dt, _) in DTYPES.items()}
STORAGE_DTYPES: dict[str, torch.dtype] = {code: dt for dt, code in DTYPES.values() if code}
STORAGE_CODES: dict[torch.dtype, str] = {dt: code for code, dt in STORAGE_DTYPES.items()}
