"""The one table of tensor types (torchao subclasses, and the plain tensor) and attribute value types.

Everything that depends on a tensor's type (flatten/rebuild, part sizes, the unpickling allowlist,
portability and re-layout, tensor-parallel slicing, ``inspect``, config.json, the README table and the
parametrized tests) reads a ``TensorType`` row; a new torchao type is one entry in ``TENSOR_TYPES``.
The rows name functions in leaf modules (``part_sizes``, ``quant_configs``, ``relayout``) that never
import this one at import time. On-disk names are stable strings chosen by us (equal to torchao's own ``_type`` names
so that stock torchao/transformers can read the files), never ``cls.__name__`` read at run time.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from . import part_sizes
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
    Float8Tensor,
    Int4PlainInt32Tensor,
    Int4PreshuffledTensor,
    Int4Tensor,
    Int4TilePackedTo4dTensor,
    Int8Tensor,
    IntxUnpackedToInt8Tensor,
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

from . import quant_configs  # noqa: E402
from .tensor_type import (  # noqa: E402, F401 - the row's vocabulary, used through this module everywhere
    OUTER_DTYPES,
    Along,
    Device,
    Family,
    Portability,
    TensorType,
    TpAxes,
    TpSplit,
)
from .relayout import cpu as cpu_layout  # noqa: E402  (relayout is a leaf: it never imports this module)
from .relayout import tinygemm  # noqa: E402
from .relayout import xpu as xpu_layout  # noqa: E402


def _t(name, cls, family, portability, packed_for, kernels, stock, note, *, dtypes=None, **facts) -> TensorType:
    return TensorType(name=name, cls=cls, family=family, portability=portability, packed_for=packed_for,
                      kernels=frozenset(kernels), stock_loadable=stock, note=note,
                      part_dtypes={part: frozenset(allowed) for part, allowed in (dtypes or {}).items()}, **facts)


def _cuda_int4_packer() -> str:
    """The packer this process's CUDA int4 kernels use: tinygemm, which ROCm builds pack differently."""
    return "rocm-tinygemm" if torch.version.hip else tinygemm.PACKER


def _plain_parts(tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An ordinary tensor is its own one part, with no attributes."""
    return {PLAIN_PART: tensor}, {}


def _plain_build(cls: type, parts: dict[str, torch.Tensor], attrs: dict[str, Any],
                 shape: torch.Size | None) -> torch.Tensor:
    """An ordinary tensor is its one part."""
    return parts[PLAIN_PART]


PLAIN_PART = "data"  # the single part of an ordinary tensor
_F = tuple(OUTER_DTYPES)
_FP8 = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
_P, _X = Portability.PORTABLE, Portability.PINNED
_CPU, _CUDA, _XPU = Device.CPU, Device.CUDA, Device.XPU
_V, _B = Along.VALUES, Along.BLOCKS
_ROW_MAJOR: TpAxes = (("qdata", (0, _V), (1, _V)), ("scale", (0, _B), (1, _B)), ("zero_point", (0, _B), (1, _B)))
_K_MAJOR_SCALES: TpAxes = (("qdata", (0, _V), (1, _V)), ("scale", (1, _B), (0, _B)), ("zero_point", (1, _B), (0, _B)))
_DIRECT, _RELAYOUT = (TpSplit.DIRECT, TpSplit.DIRECT), (TpSplit.RELAYOUT, TpSplit.RELAYOUT)
# tinygemm tiles hold 8 whole rows each (rows cut exactly); columns run through padded K tiles (re-laid out)
_TILE_ROWS: TpAxes = (("qdata", (0, _V), None), ("scale_and_zero", (1, _V), None))
_BYTES, _INT4 = part_sizes.BYTE_QDATA, part_sizes.INT4

# The ordinary torch.Tensor: a row like the others (portable, every kernel, its one part under its own name).
PLAIN = _t("Tensor", torch.Tensor, Family.PLAIN, _P, None, (d.value for d in Device), True, "plain tensor",
           names=((PLAIN_PART,), (), ()), tp=_DIRECT, tp_axes=((PLAIN_PART, (0, _V), (1, _V)),),
           part_rules=part_sizes.PLAIN, outer_dtypes=None, own_key=True, parts_of=_plain_parts, build=_plain_build)

# The torchao tensor subclasses, by on-disk name.
TENSOR_TYPES: dict[str, TensorType] = {
    t.name: t
    for t in (
        _t("Int8Tensor", Int8Tensor, Family.INT8, _P, None, {"cpu", "cuda"}, True,
           "int8 per-row weight, optional int8 dynamic activation", tp=_DIRECT, tp_axes=_ROW_MAJOR,
           dtypes=dict(qdata=("int8",), scale=_F, zero_point=("int8",), act_quant_scale=_F, act_pre_scale=_F),
           config=quant_configs.int8, part_rules=_BYTES),
        _t("Float8Tensor", Float8Tensor, Family.FLOAT8, _P, None, {"cpu", "cuda"}, True,
           "float8 weight, optional float8 dynamic activation", tp=_DIRECT, tp_axes=_ROW_MAJOR,
           dtypes=dict(qdata=_FP8, scale=_F), config=quant_configs.float8, part_rules=_BYTES),
        _t("IntxUnpackedToInt8Tensor", IntxUnpackedToInt8Tensor, Family.INTX, _P, None, {"cpu", "cuda"}, True,
           "int1..int8 values held unpacked in int8", tp=_DIRECT, tp_axes=_ROW_MAJOR,
           dtypes=dict(qdata=("int8",), scale=_F, zero_point=("int8", "int32", *_F)), config=quant_configs.intx,
           part_rules=_BYTES),
        _t("Int4TilePackedTo4dTensor", Int4TilePackedTo4dTensor, Family.INT4, _X, _CUDA, {"cuda"}, True,
           "int4 in CUDA tinygemm tile packing",
           tp=(TpSplit.DIRECT, TpSplit.RELAYOUT), tp_axes=_TILE_ROWS,
           dtypes=dict(qdata=("int32",), scale_and_zero=_F, act_pre_scale=_F),
           config=quant_configs.int4("tile_packed_to_4d"), part_rules=_INT4, geometry=part_sizes.INT4_TILES,
           relayout=tinygemm, packer_here=_cuda_int4_packer, assumed_packer=tinygemm.PACKER),
        _t("Int4OpaqueTensor", Int4OpaqueTensor, Family.INT4, _X, _CPU, {"cpu"}, False,
           "int4 in the CPU kernel's ISA-dependent packing", tp=_RELAYOUT,
           dtypes=dict(qdata=("uint8",), scale_and_zero=_F, act_pre_scale=_F), weights_only=False,
           part_rules=_INT4, geometry=part_sizes.INT4_OPAQUE, relayout=cpu_layout,
           packer_here=cpu_layout.cpu_packer,  # no assumed packer: CPU packing depends on an unknowable ISA
           former_names=("torchao.quantization.Int4OpaqueTensor",  # 0.14
                         "torchao.prototype.int4_opaque_tensor.Int4OpaqueTensor")),  # 0.15-0.16
        _t("Int4Tensor", Int4Tensor, Family.INT4, _P, None, {"cuda"}, True,
           "int4 plain nibble packing (mslk kernels)", tp=_DIRECT, tp_axes=_K_MAJOR_SCALES,
           dtypes=dict(qdata=("int8", "uint8"), scale=_F, zero_point=_F, act_pre_scale=_F),
           config=quant_configs.int4("plain"), part_rules=_INT4, geometry=part_sizes.INT4_PLAIN),
        _t("Int4PreshuffledTensor", Int4PreshuffledTensor, Family.INT4, _X, _CUDA, {"cuda"}, False,
           "int4 preshuffled for mslk CUDA kernels",
           dtypes=dict(qdata=("int8", "uint8"), group_scale=_F, group_zero=_F, row_scale=_F),
           part_rules=_INT4, geometry=part_sizes.INT4_PRESHUFFLED, packer_here=_cuda_int4_packer,
           assumed_packer=tinygemm.PACKER),
        _t("Int4PlainInt32Tensor", Int4PlainInt32Tensor, Family.INT4, _X, _XPU, {"xpu", "npu"}, True,
           "int4 packed in int32 for XPU/NPU kernels", tp=_DIRECT, tp_axes=_K_MAJOR_SCALES,
           dtypes=dict(qdata=("int32",), scale=_F, zero_point=("int8", *_F), act_pre_scale=_F),
           config=quant_configs.int4("plain_int32"), part_rules=_INT4, geometry=part_sizes.INT4_PLAIN_INT32,
           relayout=xpu_layout, packer_here=lambda: xpu_layout.PACKER,
           assumed_packer=xpu_layout.PACKER),
        _t("MXTensor", MXTensor, Family.MX, _P, None, {"cpu", "cuda"}, True,
           "OCP microscaling (mxfp8/mxfp4) with e8m0 block scales", tp=_DIRECT, tp_axes=_ROW_MAJOR,
           dtypes=dict(qdata=(*_FP8, "uint8", "float4_e2m1fn_x2"), scale=("float8_e8m0fnu", "uint8")),
           weights_only=False, config=quant_configs.mx, part_rules=part_sizes.MX),
        _t("NVFP4Tensor", NVFP4Tensor, Family.NVFP4, _P, None, {"cpu", "cuda"}, True,
           "NVIDIA fp4 with float8 block scales", tp=_DIRECT, tp_axes=_ROW_MAJOR,
           dtypes=dict(qdata=("uint8", "float4_e2m1fn_x2"), scale=("float8_e4m3fn",), per_tensor_scale=_F,
                       act_per_tensor_scale=_F),
           weights_only=False, config=quant_configs.nvfp4, part_rules=part_sizes.NVFP4),
        _t("NF4Tensor", NF4Tensor, Family.NF4, _P, None, {"cpu", "cuda"}, False,
           "QLoRA normal-float 4 with double-quantized scalers",
           names=(("quantized_data", "scaler_mean", "quantization_factor", "quantized_scalers", "nf4"), (),
                  ("block_size", "n_blocks", "scaler_block_size", "tensor_meta")),
           dtypes=dict(quantized_data=("uint8",), scaler_mean=_F, quantization_factor=_F,
                       quantized_scalers=("int8",), nf4=_F),
           part_rules=part_sizes.NF4, former_names=("torchao.dtypes.nf4tensor.NF4Tensor",)),
    )
}

_PLAIN_CLASSES = (torch.Tensor, torch.nn.Parameter)


def tensor_type_of(tensor: torch.Tensor, name: str) -> TensorType:
    """The registry row of a tensor (PLAIN for an ordinary one); refuses unknown subclasses."""
    cls = type(tensor)
    if cls in _PLAIN_CLASSES:
        return PLAIN
    entry = next((t for t in TENSOR_TYPES.values() if t.cls is cls), None)
    if entry is None:
        known = ", ".join(TENSOR_TYPES)
        raise UnsupportedTensorError(
            f"{name} is a {cls.__module__}.{cls.__qualname__}, which aockpt has no codec for; "
            f"supported types: {known}"
        )
    return entry


def tensor_type_named(type_name: str, where: str) -> TensorType:
    """The registry row of an on-disk type name (PLAIN for "Tensor"); a name outside the table is refused."""
    entry = known_type(type_name)
    if entry is None:
        raise UnsupportedTensorError(
            f"{where} has tensor type {type_name!r}, which is not in aockpt's allowlist "
            f"({', '.join(TENSOR_TYPES)}); upgrade aockpt or re-export the checkpoint"
        )
    return entry


def known_type(type_name: str) -> TensorType | None:
    """The registry row of an on-disk type name, or None where aockpt has none."""
    if not isinstance(type_name, str):
        return None
    return PLAIN if type_name == PLAIN.name else TENSOR_TYPES.get(type_name)


def relayout_types() -> dict[str, TensorType]:
    """The int4 types re-layout converts between, by name."""
    return {n: t for n, t in TENSOR_TYPES.items() if t.relayout is not None}


def relayout_target(device_type: str) -> TensorType | None:
    """The int4 type whose kernel runs on `device_type` and that re-layout can pack, or None."""
    return next((t for t in relayout_types().values() if t.packed_for == device_type), None)


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
# Dotted names torchao 0.13-0.17 pickled value classes under (tensor types keep theirs in `former_names`).
FORMER_VALUE_NAMES: dict[str, tuple[str, ...]] = {
    "SubclassTensorArgs": ("torchao.dtypes.nf4tensor.SubclassTensorArgs",),
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
