"""Migration of legacy torchao (0.7-0.17) records, read through their inert stand-ins, into torchao 0.18 tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import registry
from . import sparse24
from ..errors import CorruptCheckpointError, UnsupportedTensorError
from ..registry import TensorType
from .record import Weight, checked, plain_field, read_field
from .standins import LegacyFunction, LegacyObject, LegacyTensor, Role, role_of, short_name
from torchao.prototype.quantization.int4 import Int4OpaqueTensor  # noqa: E402
from torchao.quantization import (  # noqa: E402
    Float8Tensor,
    Int4TilePackedTo4dTensor,
    Int8Tensor,
    IntxUnpackedToInt8Tensor,
    MappingType,
    PerRow,
    PerTensor,
)
from torchao.quantization.quant_primitives import ZeroPointDomain  # noqa: E402
from torchao.float8.inference import Float8MMConfig  # noqa: E402
from torchao.quantization.quantize_.workflows import (  # noqa: E402
    QuantizeTensorToFloat8Kwargs,
    QuantizeTensorToInt8Kwargs,
)
from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (  # noqa: E402
    IntxUnpackedToInt8TensorActivationQuantization,
)


def _unsupported(why: str) -> Callable[[Weight], torch.Tensor]:
    """A table entry for a legacy layout aockpt cannot turn into a current tensor."""

    def refuse(w: Weight) -> torch.Tensor:
        raise UnsupportedTensorError(
            f"{w.where} is a torchao<=0.17 {short_name(w.impl)} ({_layout_name(w)}), which aockpt cannot "
            f"migrate: {why}; re-quantize the original model with torchao>=0.18"
        )

    return refuse


def _layout_name(w: Weight) -> str:
    return short_name(w.layout) if isinstance(w.layout, LegacyObject) else "unknown layout"


def _int8_act_kwargs(w: Weight) -> Any:
    """Int8Tensor's activation quantization equal to the legacy input_quant_func (None: weight-only)."""
    if w.act is None:
        return None
    mapping = _INT8_ACT.get(w.act)
    if mapping is None:
        raise UnsupportedTensorError(
            f"{w.where} quantizes activations with torchao<=0.17 {w.act}, which has no torchao 0.18 "
            "Int8Tensor equivalent; re-quantize the original model with torchao>=0.18"
        )
    return QuantizeTensorToInt8Kwargs(granularity=PerRow(), mapping_type=mapping)


def _intx_act(w: Weight) -> Any:
    """IntxUnpackedToInt8Tensor's activation quantization for the legacy input_quant_func."""
    if w.act is None:
        return None
    if w.act != "_int8_asymm_per_token_quant":
        raise UnsupportedTensorError(
            f"{w.where} pairs intx weights with torchao<=0.17 {w.act}; torchao 0.18 only has int8 "
            "asymmetric per-token activations for intx weights; re-quantize with torchao>=0.18"
        )
    return IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN.value  # the plain str 0.18 stores


def _intx_from_int8(w: Weight, q: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """IntxUnpackedToInt8Tensor from signed values already in int8 (same dequantize_affine math)."""
    scale = w.per_block(w.tensor("scale"), "scale")
    zero = torch.zeros(w.blocks(), dtype=torch.int8) if zero is None else w.per_block(zero, "zero_point")
    return IntxUnpackedToInt8Tensor(q, scale, zero, getattr(torch, f"int{bits}"), w.block_size, w.dtype,
                                    _intx_act(w))


def _bits_of_range(w: Weight, signed: bool) -> int:
    """The bit width a legacy quant_min/quant_max pair describes (8 when the record left it None)."""
    lo, hi = w.quant_range
    if lo is None and hi is None:
        return 8
    for bits in range(1, 9):
        if (lo, hi) == ((-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)):
            return bits
    raise UnsupportedTensorError(f"{w.where} has the legacy quant range {lo}..{hi}, which no current tensor holds")


def _from_plain(w: Weight) -> torch.Tensor:
    """PlainLayout: int8 values -> Int8Tensor; a narrower signed range -> IntxUnpackedToInt8Tensor."""
    q = w.tensor("int_data")
    if q.dtype != torch.int8:
        raise UnsupportedTensorError(f"{w.where}: legacy PlainLayout data of dtype {q.dtype} has no current tensor")
    return _from_int8_values(w, q)


def _from_semi_sparse(w: Weight) -> torch.Tensor:
    """SemiSparseLayout: cuSPARSELt-compressed 2:4 int8 -> the same values dense, as PlainLayout would hold."""
    rows, cols = w.shape
    return _from_int8_values(w, sparse24.cusparselt_to_dense(w.tensor("int_data"), rows, cols, w.where))


def _from_int8_values(w: Weight, q: torch.Tensor) -> torch.Tensor:
    """Int8Tensor from signed 8-bit values, or IntxUnpackedToInt8Tensor when the range is narrower."""
    bits = _bits_of_range(w, signed=True)
    zero = w.optional("zero_point")
    if bits < 8:
        return _intx_from_int8(w, q, zero, bits)
    if zero is not None and bool(zero.any()):
        raise UnsupportedTensorError(f"{w.where}: asymmetric int8 weights have no torchao 0.18 Int8Tensor form")
    scale = w.per_block(w.tensor("scale"), "scale")
    return Int8Tensor(q, scale, w.block_size, w.dtype, act_quant_kwargs=_int8_act_kwargs(w))


def _from_qdq(w: Weight) -> torch.Tensor:
    """QDQLayout (ExecuTorch q/dq): signed intx values in int8 -> IntxUnpackedToInt8Tensor."""
    q = w.tensor("int_data")
    if q.dtype != torch.int8:
        raise CorruptCheckpointError(f"{w.where}: legacy QDQLayout data has dtype {q.dtype}, expected int8")
    return _intx_from_int8(w, q, w.optional("zero_point"), _bits_of_range(w, signed=True))


def _unpack_uintx(packed: LegacyTensor, where: str) -> tuple[torch.Tensor, int]:
    """Undo torchao's UintxTensor bit packing (4/2/1-bit shards, torchao.dtypes.uintx.bitpacking)."""
    bits = read_field(packed, "bit_width", int, where)
    dim = read_field(packed, "pack_dim", int, where)
    if bits not in _UINTX_SHARDS or dim not in (-1, packed.dim() - 1):
        raise UnsupportedTensorError(f"{where}: legacy UintxTensor of {bits} bits packed along dim {dim}")
    out = None
    for shard_bits, shift in _UINTX_SHARDS[bits]:
        shard = plain_field(packed, f"int{shard_bits}_shard", where)
        per_byte = 8 // shard_bits
        mask = (1 << shard_bits) - 1
        parts = [(shard >> (shard_bits * i)) & mask for i in range(per_byte)]
        values = torch.cat(parts, dim=-1) << shift
        out = values if out is None else out | values
    if list(out.shape) != list(packed.shape):
        raise CorruptCheckpointError(f"{where}: UintxTensor shards unpack to {tuple(out.shape)}, not {tuple(packed.shape)}")
    return out, bits


# bit width -> (shard bits, shift) in torchao's pack order; values = OR of (shard unpacked << shift)
_UINTX_SHARDS = {
    1: ((1, 0),), 2: ((2, 0),), 3: ((2, 0), (1, 2)), 4: ((4, 0),), 5: ((4, 0), (1, 4)),
    6: ((4, 0), (2, 4)), 7: ((4, 0), (2, 4), (1, 6)),
}


def _from_uintx(w: Weight) -> torch.Tensor:
    """UintxLayout (unsigned sub-byte, bit-packed): unpack, shift to signed -> IntxUnpackedToInt8Tensor."""
    packed = read_field(w.impl, "int_data", LegacyTensor, w.where)
    values, bits = _unpack_uintx(packed, w.where)
    zero = w.tensor("zero_point")
    if zero.dtype.is_floating_point or w.zero_domain is not ZeroPointDomain.INT:
        raise UnsupportedTensorError(f"{w.where}: uintx weights with a float zero point have no current tensor")
    offset = 1 << (bits - 1)  # (q - z) is unchanged when both move by the same offset
    q = (values.to(torch.int16) - offset).to(torch.int8)
    if int(zero.min()) < 0 or int(zero.max()) >= (1 << bits):
        raise CorruptCheckpointError(f"{w.where}: uintx zero points outside 0..{(1 << bits) - 1}")
    return _intx_from_int8(w, q, (zero.to(torch.int16) - offset).to(torch.int8), bits)


def _weight_only(w: Weight) -> None:
    """Refuse an activation quantization that the weight-only int4 tensors of torchao 0.18 cannot carry."""
    if w.act is not None:
        raise UnsupportedTensorError(
            f"{w.where} pairs int4 weights with torchao<=0.17 activation {w.act}, which no torchao 0.18 int4 "
            "tensor carries; re-quantize the original model with torchao>=0.18"
        )


def _from_marlin_sparse(w: Weight) -> torch.Tensor:
    """MarlinSparseLayout (2:4 int4, symmetric, zero point 8) -> IntxUnpackedToInt8Tensor of the same values."""
    _weight_only(w)
    n, k = w.shape
    group = read_field(w.impl, "group_size", int, w.where)
    if read_field(w.impl, "num_bits", int, w.where) != 4 or w.block_size != [1, group] or w.quant_range != (0, 15):
        raise UnsupportedTensorError(f"{w.where}: a Marlin 2:4 weight other than 4-bit with groups along K")
    codes, scale = sparse24.marlin24_to_dense(w.tensor("int_data"), w.tensor("scale"), w.tensor("meta"),
                                             k, n, group, w.where)
    zero = w.tensor("zero")
    if zero.numel() != scale.numel() or bool((zero != 8).any()):
        raise UnsupportedTensorError(f"{w.where}: Marlin 2:4 zero points other than 8 are not what its kernel used")
    if int(codes.min()) < 0 or int(codes.max()) > 15:
        raise CorruptCheckpointError(f"{w.where}: Marlin 2:4 codes outside 0..15; the file is corrupt")
    zero_point = torch.zeros(w.blocks(), dtype=torch.int8)
    return IntxUnpackedToInt8Tensor((codes - 8).to(torch.int8), w.per_block(scale, "scale"), zero_point,
                                    torch.int4, w.block_size, w.dtype, None)


def _from_int4_cpu(w: Weight) -> torch.Tensor:
    """Int4CPULayout -> Int4OpaqueTensor: the same CPU kernel packing, moved over as is."""
    _weight_only(w)
    return Int4OpaqueTensor(w.tensor("packed_weight"), w.tensor("scale_and_zero"), w.block_size,
                            torch.Size(w.shape))


def _from_tensor_core_tiled(w: Weight) -> torch.Tensor:
    """TensorCoreTiledLayout -> Int4TilePackedTo4dTensor: the same tinygemm packing, moved over as is."""
    _weight_only(w)
    return Int4TilePackedTo4dTensor(w.tensor("packed_weight"), w.tensor("scale_and_zero"), w.block_size,
                                    torch.Size(w.shape))


_FLOAT8_GRANULARITIES = (PerRow, PerTensor)


def _float8_act_kwargs(w: Weight) -> Any:
    """Float8Tensor's activation quantization equal to torchao<=0.17's `_input_activation_quant_func_fp8`."""
    if w.act is None:
        return None
    granularity = w.act_kwargs.get("activation_granularity")
    dtype = w.act_kwargs.get("activation_dtype")
    if (w.act != "_input_activation_quant_func_fp8" or not isinstance(granularity, _FLOAT8_GRANULARITIES)
            or dtype not in (torch.float8_e4m3fn, torch.float8_e5m2)):
        raise UnsupportedTensorError(
            f"{w.where}: torchao<=0.17 float8 activation {w.act}({w.act_kwargs}) has no torchao 0.18 "
            "equivalent; re-quantize with Float8DynamicActivationFloat8WeightConfig"
        )
    return QuantizeTensorToFloat8Kwargs(float8_dtype=dtype, granularity=granularity)


def _from_float8(w: Weight) -> torch.Tensor:
    """Float8Layout -> Float8Tensor, weight-only or with the same dynamic float8 activation and mm_config."""
    act_quant_kwargs = _float8_act_kwargs(w)
    if w.impl.legacy_state.get("transposed"):
        raise UnsupportedTensorError(f"{w.where}: a transposed legacy Float8Layout weight is not migrated")
    mm_config = w.layout.legacy_state.get("mm_config") if isinstance(w.layout, LegacyObject) else None
    if mm_config is not None and not isinstance(mm_config, Float8MMConfig):
        raise CorruptCheckpointError(f"{w.where}: Float8Layout mm_config is a {type(mm_config).__name__}")
    scale = w.per_block(w.tensor("scale"), "scale")
    return Float8Tensor(w.tensor("float8_data"), scale, block_size=w.block_size, mm_config=mm_config,
                        act_quant_kwargs=act_quant_kwargs, dtype=w.dtype)


_INT8_ACT = {
    "_int8_symm_per_token_reduced_range_quant": MappingType.SYMMETRIC,
    "_int8_symm_per_token_reduced_range_quant_noop_decode": MappingType.SYMMETRIC,
    "_int8_symm_per_token_quant": MappingType.SYMMETRIC,
    "_int8_asymm_per_token_quant": MappingType.ASYMMETRIC,
}

@dataclass(frozen=True)
class Migration:
    """What one legacy tensor-impl becomes (registry rows; several where the record's fields decide; none
    where it is unsupported) and the function that builds it."""

    becomes: tuple[TensorType, ...]
    build: Callable[[Weight], torch.Tensor]

    def target_text(self) -> str:
        """The targets as `describe` and the docs name them."""
        return " | ".join(t.name for t in self.becomes) or "unsupported"


_T = registry.TENSOR_TYPES
_INT8, _INTX, _FLOAT8 = _T["Int8Tensor"], _T["IntxUnpackedToInt8Tensor"], _T["Float8Tensor"]
_OPAQUE, _TILES = _T["Int4OpaqueTensor"], _T["Int4TilePackedTo4dTensor"]

# Legacy tensor-impl class name -> what it becomes in torchao 0.18 and how.
MIGRATIONS: dict[str, Migration] = {
    "PlainAQTTensorImpl": Migration((_INT8, _INTX), _from_plain),
    "QDQTensorImpl": Migration((_INTX,), _from_qdq),
    "_Impl": Migration((_INTX,), _from_qdq),
    "UintxAQTTensorImpl": Migration((_INTX,), _from_uintx),
    "Int4CPUAQTTensorImpl": Migration((_OPAQUE,), _from_int4_cpu),
    "TensorCoreTiledAQTTensorImpl": Migration((_TILES,), _from_tensor_core_tiled),
    "Float8AQTTensorImpl": Migration((_FLOAT8,), _from_float8),
    "Int4XPUAQTTensorImpl": Migration((), _unsupported(
        "its XPU packing and integer zero point were never produced for a test here")),
    "SemiSparseAQTTensorImpl": Migration((_INT8,), _from_semi_sparse),
    "CutlassSemiSparseTensorImpl": Migration((), _unsupported("CUTLASS 2:4 float8 packing is CUDA-only")),
    "MarlinSparseAQTTensorImpl": Migration((_INTX,), _from_marlin_sparse),
    "MarlinQQQAQTTensorImpl": Migration((), _unsupported("torchao 0.18 has no Marlin QQQ tensor")),
    "GemliteAQTTensorImpl": Migration((), _unsupported("the gemlite bit packing is not decoded")),
    "FloatxTensorCoreAQTTensorImpl": Migration((), _unsupported("torchao 0.18 has no fp6/floatx tensor")),
    "BlockSparseAQTTensorImpl": Migration((), _unsupported("torchao 0.18 has no block-sparse tensor")),
    "Int4PackedTensorImpl": Migration((), _unsupported("CUTLASS int4 activation packing is CUDA-only")),
    "DA8W4CPUAQTTensorImpl": Migration((), _unsupported("its CPU da8w4 packing is not decoded")),
    "PackedLinearInt8DynamicActivationIntxWeightAQTTensorImpl": Migration((), _unsupported(
        "its packing belongs to torchao's optional C++ kernels")),
}


def _kind(obj: Any) -> Role | None:
    """A weight record's role; an autoquant class is an AQT or an activation wrapper by its pickled fields."""
    role = role_of(obj)
    if role is Role.AUTOQUANT:
        return Role.ACT if "original_weight_tensor" in obj.legacy_state else Role.AQT
    return role


def _unwrap(name: str, obj: Any) -> tuple[LegacyTensor, LegacyFunction | None, dict[str, Any]]:
    """The AQT record, its activation function (None for weight-only) and that function's kwargs."""
    role = _kind(obj)
    if role is Role.ACT:
        inner = read_field(obj, "original_weight_tensor", LegacyTensor, name)
        act = obj.legacy_state.get("input_quant_func")
        if not isinstance(act, LegacyFunction):
            raise UnsupportedTensorError(
                f"{name} quantizes activations with {act!r}, which is not a torchao<=0.17 function aockpt knows"
            )
        if _kind(inner) is not Role.AQT:
            raise UnsupportedTensorError(f"{name} wraps a {type(inner).__name__}, which aockpt cannot migrate")
        kwargs = obj.legacy_state.get("quant_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise CorruptCheckpointError(f"{name}: quant_kwargs is a {type(kwargs).__name__}, not a dict")
        return inner, act, kwargs
    if role is Role.AQT:
        return obj, None, {}
    raise UnsupportedTensorError(f"{name} is a {type(obj).__name__}, not a legacy torchao quantized weight")


def _plan(name: str, obj: Any) -> tuple[Weight, Migration]:
    """The parsed legacy weight and its migration."""
    aqt, act, act_kwargs = _unwrap(name, obj)
    w = Weight(aqt, act, name, act_kwargs)
    impl = short_name(w.impl)
    if impl not in MIGRATIONS:
        raise UnsupportedTensorError(
            f"{name} uses the legacy torchao layout {impl} ({_layout_name(w)}), which aockpt does not know"
        )
    return w, MIGRATIONS[impl]


def is_legacy(obj: Any) -> bool:
    """Whether a loaded value is a legacy torchao record that needs migrating."""
    return isinstance(obj, LegacyTensor)


def migrate(name: str, obj: Any) -> torch.Tensor:
    """The torchao 0.18 tensor computing what a legacy (torchao<=0.17) weight record computed.

    An `Int4CPULayout` weight keeps the bytes of the CPU that packed it, which the record does not name:
    it computes right only on a machine of that ISA; `load_quantized(..., cpu_packer=, relayout=True)`
    re-lays it out for this one (docs/portability.md).

    Raises:
        UnsupportedTensorError: a layout or activation quantization with no current equivalent.
        CorruptCheckpointError: a record whose fields are not what the old release stored.
    """
    if role_of(obj) is Role.FLOAT:
        return obj.as_subclass(torch.Tensor).detach()
    w, migration = _plan(name, obj)
    try:
        return checked(migration.build(w), name)
    except (AssertionError, ValueError, RuntimeError, TypeError) as e:
        if isinstance(e, (UnsupportedTensorError, CorruptCheckpointError)):
            raise
        raise CorruptCheckpointError(
            f"{name}: the legacy {short_name(w.impl)} fields do not form a valid tensor ({e}); the file is corrupt"
        ) from e


def migrate_state_dict(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A state dict with every legacy record migrated and every other tensor kept as is."""
    return {k: migrate(k, v) if is_legacy(v) else v for k, v in state_dict.items()}


def describe(obj: Any, name: str = "weight") -> str:
    """One line for ``inspect``: which legacy type and layout it is and what it becomes."""
    if role_of(obj) is Role.FLOAT:
        return f"torchao<=0.17 {short_name(obj)} {obj.dtype} -> plain tensor"
    w, migration = _plan(name, obj)
    target = migration.target_text()
    if len(migration.becomes) > 1:  # the record's fields decide: build it to say which
        target = registry.tensor_type_of(migrate(name, obj), name).name
    act = f" + {w.act}" if w.act else ""
    return f"torchao<=0.17 AffineQuantizedTensor/{_layout_name(w)} {w.impl.dtype}{act} -> {target}"
