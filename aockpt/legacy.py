"""Legacy torchao (0.7-0.17) records: inert stand-ins for deleted classes and their migration."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import torch

from . import registry, sparse24  # noqa: F401  (registry imports torchao quietly before the names below)
from .errors import CorruptCheckpointError, UnsupportedTensorError
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
from torchao.quantization.quant_primitives import TorchAODType, ZeroPointDomain  # noqa: E402
from torchao.float8.inference import Float8MMConfig  # noqa: E402
from torchao.quantization.quantize_.workflows import (  # noqa: E402
    QuantizeTensorToFloat8Kwargs,
    QuantizeTensorToInt8Kwargs,
)
from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (  # noqa: E402
    IntxUnpackedToInt8TensorActivationQuantization,
)

_MAX_STATE_ITEMS = 64  # a legacy object's pickled __dict__ has < 20 entries; more is junk


def _checked_state(state: Any, legacy_name: str) -> dict[str, Any]:
    """The attribute dict a pickle's BUILD/__setstate__ hands over, refused unless it is one."""
    if isinstance(state, tuple) and len(state) == 2 and state[1] in (None, {}):
        state = state[0]
    if state is None:
        return {}
    if type(state) is not dict or len(state) > _MAX_STATE_ITEMS or not all(type(k) is str for k in state):
        raise CorruptCheckpointError(
            f"a pickled {legacy_name} carries a state of type {type(state).__name__} instead of an "
            f"attribute dict; the file is corrupt or hostile and was not loaded further"
        )
    return dict(state)


class LegacyTensor(torch.Tensor):
    """Inert record of a pickled legacy torchao tensor subclass: its wrapper metadata and attributes.

    torch's weights-only unpickler rebuilds it through ``_rebuild_from_type_v2(
    _rebuild_wrapper_subclass, cls, (cls, dtype, size, ...), state)``: the wrapper gets shape, dtype
    and device without storage and ``__setstate__`` receives the pickled ``__dict__``. It runs no
    torch op and cannot be constructed any other way.
    """

    legacy_name: str = "?"
    __torch_function__ = torch._C._disabled_torch_function_impl

    def __new__(cls, *args: Any, **kwargs: Any) -> LegacyTensor:
        raise CorruptCheckpointError(
            f"the pickle calls the legacy class {cls.legacy_name} directly, which no torchao release "
            "wrote; the file is corrupt or hostile and was not loaded further"
        )

    def __setstate__(self, state: Any) -> None:
        self.legacy_state = _checked_state(state, self.legacy_name)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise UnsupportedTensorError(
            f"{cls.legacy_name} is a legacy torchao record that cannot compute; "
            "convert it with aockpt.legacy.migrate first"
        )

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"<legacy {self.legacy_name} shape={tuple(self.shape)} dtype={self.dtype}>"


class LegacyObject:
    """Inert record of a pickled legacy plain object (a layout): NEWOBJ args and BUILD state."""

    legacy_name: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> LegacyObject:
        if kwargs or len(args) > _MAX_STATE_ITEMS:
            raise CorruptCheckpointError(
                f"the pickle builds a legacy {cls.legacy_name} with unexpected arguments; "
                "the file is corrupt or hostile and was not loaded further"
            )
        self = super().__new__(cls)
        self.legacy_args = args
        self.legacy_state = {}
        return self

    def __init__(self, *args: Any) -> None:
        """Nothing to do: ``__new__`` kept the arguments."""

    def __setstate__(self, state: Any) -> None:
        self.legacy_state = _checked_state(state, self.legacy_name)

    def __repr__(self) -> str:
        return f"<legacy {self.legacy_name} {self.legacy_state}>"


class LegacyFunction:
    """Inert stand-in for a pickled function global (an activation quant function); never runs."""

    def __init__(self, legacy_name: str) -> None:
        self.legacy_name = legacy_name

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise CorruptCheckpointError(
            f"the pickle calls the legacy function {self.legacy_name}, which no torchao release did "
            "while saving; the file is corrupt or hostile and was not loaded further"
        )

    def __repr__(self) -> str:
        return f"<legacy function {self.legacy_name}>"


def _stand_in(base: type, legacy_name: str) -> type:
    """A distinct inert subclass of ``base`` for one legacy dotted name."""
    return type(legacy_name.rsplit(".", 1)[1], (base,), {"legacy_name": legacy_name, "__module__": __name__})




class Role(str, enum.Enum):
    """What a legacy global was, which decides its stand-in and how migration reads it."""

    AQT = "AffineQuantizedTensor"  # weight wrapper: tensor_impl, block_size, quant range, zero domain
    ACT = "LinearActivationQuantizedTensor"  # original_weight_tensor + input_quant_func
    AUTOQUANT = "autoquant weight"  # an AQT in some releases, an ACT in others: its pickled fields decide
    IMPL = "tensor impl"  # the layout-specific inner tensors; keys the migration table
    PACKED = "UintxTensor"  # bit-packed shards inside a uintx impl
    FLOAT = "autoquant float weight"  # a plain float tensor subclass
    LAYOUT = "layout"
    FUNCTION = "activation quant function"


_DT, _PDT = "torchao.dtypes", "torchao.prototype.dtypes"
_Q, _AQ = "torchao.quantization", "torchao.quantization.autoquant"
_G4 = ("32", "64", "128", "256")
# autoquant's int4 wrappers pass activations through these: a dtype cast, not a quantization, so the
# weight migrates as weight-only (torchao 0.18's int4 kernels take only that dtype and say so)
_ACTIVATION_CASTS = ("_identity", "_to_bfloat16", "_to_float16")

# Every legacy global torchao 0.7-0.17 could pickle in a weight (collected from the released sources).
LEGACY_GLOBALS: dict[str, Role] = {
    f"{_DT}.affine_quantized_tensor.AffineQuantizedTensor": Role.AQT,
    f"{_DT}.affine_quantized_tensor.MarlinQQQTensor": Role.AQT,
    f"{_DT}.uintx.marlin_qqq_tensor.MarlinQQQTensor": Role.AQT,
    f"{_PDT}.uintx.marlin_qqq_tensor.MarlinQQQTensor": Role.AQT,
    f"{_DT}.uintx.packed_linear_int8_dynamic_activation_intx_weight_layout._AffineQuantizedTensor": Role.AQT,
    f"{_Q}.linear_activation_quantized_tensor.LinearActivationQuantizedTensor": Role.ACT,
    **{f"{_AQ}.AQInt8WeightOnlyQuantizedLinearWeight{s}": Role.AUTOQUANT for s in ("", "2", "3")},
    **{f"{_AQ}.AQInt4G{g}WeightOnlyQuantizedLinearWeight": Role.AUTOQUANT for g in _G4},
    **{f"{_AQ}.AQGemliteInt4G{g}WeightOnlyQuantizedLinearWeight": Role.AUTOQUANT for g in _G4},
    f"{_AQ}.AQInt4G128WeightOnlyQuantizedMarlinSparseLinearWeight": Role.AUTOQUANT,
    f"{_AQ}.AQFloat8WeightOnlyQuantizedLinearWeight": Role.AUTOQUANT,
    f"{_AQ}.AQInt8DynamicallyQuantizedLinearWeight": Role.AUTOQUANT,
    f"{_AQ}.AQInt8DynamicallyQuantizedSemiSparseLinearWeight": Role.AUTOQUANT,
    f"{_AQ}.AQFloat8PerRowScalingDynamicallyQuantizedLinearWeight": Role.AUTOQUANT,
    f"{_AQ}.AQFloat8PerTensorScalingDynamicallyQuantizedLinearWeight": Role.AUTOQUANT,
    **{f"{_AQ}.AQ{k}LinearWeight": Role.FLOAT for k in ("Default", "Float32", "BFloat16", "Float16")},
    f"{_DT}.uintx.plain_layout.PlainAQTTensorImpl": Role.IMPL,
    f"{_DT}.uintx.tensor_core_tiled_layout.TensorCoreTiledAQTTensorImpl": Role.IMPL,
    f"{_DT}.uintx.tensor_core_tiled_layout.Int4CPUAQTTensorImpl": Role.IMPL,
    f"{_DT}.uintx.int4_cpu_layout.Int4CPUAQTTensorImpl": Role.IMPL,
    f"{_DT}.uintx.int4_xpu_layout.Int4XPUAQTTensorImpl": Role.IMPL,
    f"{_DT}.uintx.q_dq_layout.QDQTensorImpl": Role.IMPL,
    f"{_DT}.uintx.q_dq_layout._Impl": Role.IMPL,
    f"{_DT}.uintx.semi_sparse_layout.SemiSparseAQTTensorImpl": Role.IMPL,
    f"{_DT}.uintx.marlin_sparse_layout.MarlinSparseAQTTensorImpl": Role.IMPL,
    f"{_DT}.uintx.marlin_qqq_layout.MarlinQQQAQTTensorImpl": Role.IMPL,
    f"{_DT}.uintx.packed_linear_int8_dynamic_activation_intx_weight_layout."
    "PackedLinearInt8DynamicActivationIntxWeightAQTTensorImpl": Role.IMPL,
    f"{_DT}.floatx.float8_layout.Float8AQTTensorImpl": Role.IMPL,
    **{f"{m}.uintx.uintx_layout.UintxAQTTensorImpl": Role.IMPL for m in (_DT, _PDT)},
    f"{_PDT}.uintx.uintx_utils.UintxAQTTensorImpl": Role.IMPL,
    **{f"{m}.uintx.uintx_layout.UintxTensor": Role.PACKED for m in (_DT, _PDT)},
    f"{_PDT}.uintx.uintx_utils.UintxTensor": Role.PACKED,
    **{f"{m}.{path}": Role.IMPL for m in (_DT, _PDT) for path in (
        "floatx.floatx_tensor_core_layout.FloatxTensorCoreAQTTensorImpl",
        "uintx.block_sparse_layout.BlockSparseAQTTensorImpl",
        "uintx.cutlass_int4_packed_layout.Int4PackedTensorImpl",
        "uintx.dyn_int8_act_int4_wei_cpu_layout.DA8W4CPUAQTTensorImpl",
        "uintx.gemlite_layout.GemliteAQTTensorImpl",
        "uintx.marlin_qqq_tensor.MarlinQQQAQTTensorImpl",
    )},
    f"{_DT}.floatx.cutlass_semi_sparse_layout.CutlassSemiSparseTensorImpl": Role.IMPL,
    f"{_DT}.utils.PlainLayout": Role.LAYOUT,
    **{f"{_DT}.{path}": Role.LAYOUT for path in (
        "uintx.tensor_core_tiled_layout.TensorCoreTiledLayout",
        "uintx.tensor_core_tiled_layout.Int4CPULayout",
        "uintx.int4_cpu_layout.Int4CPULayout",
        "uintx.int4_xpu_layout.Int4XPULayout",
        "uintx.q_dq_layout.QDQLayout",
        "uintx.semi_sparse_layout.SemiSparseLayout",
        "uintx.marlin_sparse_layout.MarlinSparseLayout",
        "uintx.marlin_qqq_layout.MarlinQQQLayout",
        "uintx.packed_linear_int8_dynamic_activation_intx_weight_layout."
        "PackedLinearInt8DynamicActivationIntxWeightLayout",
        "floatx.float8_layout.Float8Layout",
        "floatx.cutlass_semi_sparse_layout.CutlassSemiSparseLayout",
    )},
    **{f"{m}.{path}": Role.LAYOUT for m in (_DT, _PDT) for path in (
        "uintx.uintx_layout.UintxLayout",
        "floatx.floatx_tensor_core_layout.FloatxTensorCoreLayout",
        "uintx.block_sparse_layout.BlockSparseLayout",
        "uintx.cutlass_int4_packed_layout.CutlassInt4PackedLayout",
        "uintx.dyn_int8_act_int4_wei_cpu_layout.Int8DynamicActInt4WeightCPULayout",
        "uintx.gemlite_layout.GemlitePackedLayout",
        "uintx.marlin_qqq_tensor.MarlinQQQLayout",
    )},
    f"{_PDT}.uintx.uintx_utils.UintxLayout": Role.LAYOUT,
    **{f"{_Q}.quant_api.{f}": Role.FUNCTION for f in (
        "_int8_symm_per_token_reduced_range_quant",
        "_int8_symm_per_token_reduced_range_quant_noop_decode",
        "_int8_symm_per_token_quant",
        "_int8_asymm_per_token_quant",
        "_uint8_asymm_per_token_quant",
        "_int8_symm_cutlass_quant",
        "_int4_symm_cutlass_quant",
        "_float8_cutlass_quant",
        "_float8_cutlass_quant_sparse",
        "_input_activation_quant_func_fp8",
    )},
    **{f"{_AQ}.{f}": Role.FUNCTION for f in _ACTIVATION_CASTS},
}

_STAND_IN_OF_ROLE = {
    Role.AQT: lambda name: _stand_in(LegacyTensor, name),
    Role.ACT: lambda name: _stand_in(LegacyTensor, name),
    Role.AUTOQUANT: lambda name: _stand_in(LegacyTensor, name),
    Role.IMPL: lambda name: _stand_in(LegacyTensor, name),
    Role.PACKED: lambda name: _stand_in(LegacyTensor, name),
    Role.FLOAT: lambda name: _stand_in(LegacyTensor, name),
    Role.LAYOUT: lambda name: _stand_in(LegacyObject, name),
    Role.FUNCTION: LegacyFunction,
}

# Old fully-qualified global name -> inert stand-in registered under that name for unpickling.
STAND_INS: dict[str, Any] = {
    **{name: _STAND_IN_OF_ROLE[role](name) for name, role in LEGACY_GLOBALS.items()},
    # enums torchao 0.18 still has under the same name and members: the real class is the stand-in
    f"{_Q}.quant_primitives.ZeroPointDomain": ZeroPointDomain,
    f"{_Q}.quant_primitives.TorchAODType": TorchAODType,
}


# ---- migration: legacy record -> current torchao tensor -------------------------------------------

_INT4_KERNEL_RANGE = (0, 15)  # tinygemm and the CPU int4 kernel: w = (q - 8) * scale + zero


def _role(obj: Any) -> Role | None:
    """The role of a stand-in instance, None for anything else."""
    return LEGACY_GLOBALS.get(getattr(type(obj), "legacy_name", None))


def _short(obj: Any) -> str:
    """The legacy class name without its module."""
    return type(obj).legacy_name.rsplit(".", 1)[1]


def _get(rec: Any, key: str, kinds: type | tuple[type, ...], where: str) -> Any:
    """One attribute of a legacy record, checked to be of the type the old class always stored."""
    value = rec.legacy_state.get(key) if isinstance(rec, (LegacyTensor, LegacyObject)) else None
    if not isinstance(value, kinds) or (kinds is torch.Tensor and isinstance(value, LegacyTensor)):
        raise CorruptCheckpointError(
            f"{where}: the legacy {getattr(rec, 'legacy_name', type(rec).__name__)} has {key}="
            f"{type(value).__name__}, expected {getattr(kinds, '__name__', kinds)}; the file is corrupt"
        )
    return value


def _plain(rec: Any, key: str, where: str) -> torch.Tensor:
    """A plain (storage-backed) inner tensor of a legacy record."""
    t = _get(rec, key, torch.Tensor, where)
    if type(t) is not torch.Tensor:
        raise CorruptCheckpointError(f"{where}: the legacy {key} is a {type(t).__name__}, not a plain tensor")
    return t


def _optional_plain(rec: Any, key: str, where: str) -> torch.Tensor | None:
    """A plain inner tensor that the old class stored as None when unused."""
    return None if rec.legacy_state.get(key) is None else _plain(rec, key, where)


class _Weight:
    """The fields of a legacy AffineQuantizedTensor record that every migration reads."""

    def __init__(self, aqt: LegacyTensor, act: LegacyFunction | None, where: str,
                 act_kwargs: dict[str, Any] | None = None) -> None:
        self.where = where
        self.act_kwargs = act_kwargs or {}
        self.impl = _get(aqt, "tensor_impl", LegacyTensor, where)
        if _role(self.impl) is not Role.IMPL:
            raise CorruptCheckpointError(f"{where}: tensor_impl is a {type(self.impl).__name__}, not a layout impl")
        self.layout = self.impl.legacy_state.get("_layout")
        self.block_size = list(_get(aqt, "block_size", (tuple, list), where))
        if not all(type(b) is int and b > 0 for b in self.block_size) or len(self.block_size) != aqt.dim():
            raise CorruptCheckpointError(f"{where}: block_size {self.block_size} does not fit shape {tuple(aqt.shape)}")
        self.shape = list(aqt.shape)
        stored = sum(t.numel() * t.element_size() for t in self.impl.legacy_state.values() if isinstance(t, torch.Tensor))
        if _numel(self.shape) > 8 * stored:  # no layout stores less than one bit per value
            raise CorruptCheckpointError(
                f"{where}: a {self.shape} weight cannot be held in the {stored} bytes its record stores; the "
                "file is corrupt or crafted (refused before allocating anything for it)"
            )
        self.dtype = aqt.dtype
        self.quant_range = (aqt.legacy_state.get("quant_min"), aqt.legacy_state.get("quant_max"))
        self.zero_domain = aqt.legacy_state.get("zero_point_domain")
        act_name = act.legacy_name.rsplit(".", 1)[1] if act is not None else None
        self.act = None if act_name in _ACTIVATION_CASTS else act_name

    def blocks(self) -> list[int]:
        """The scale/zero-point shape with one entry per block (the keepdim form torchao 0.18 uses)."""
        return [s // b for s, b in zip(self.shape, self.block_size)]

    def tensor(self, key: str) -> torch.Tensor:
        return _plain(self.impl, key, self.where)

    def optional(self, key: str) -> torch.Tensor | None:
        return _optional_plain(self.impl, key, self.where)

    def per_block(self, t: torch.Tensor, key: str) -> torch.Tensor:
        """A scale or zero point reshaped to one value per block (values untouched)."""
        if t.numel() != _numel(self.blocks()):
            raise CorruptCheckpointError(
                f"{self.where}: {key} has {t.numel()} values for {self.blocks()} blocks; the file is corrupt"
            )
        return t.reshape(self.blocks())


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _unsupported(why: str) -> Callable[[_Weight], torch.Tensor]:
    """A table entry for a legacy layout aockpt cannot turn into a current tensor."""

    def refuse(w: _Weight) -> torch.Tensor:
        raise UnsupportedTensorError(
            f"{w.where} is a torchao<=0.17 {_short(w.impl)} ({_layout_name(w)}), which aockpt cannot "
            f"migrate: {why}; re-quantize the original model with torchao>=0.18"
        )

    return refuse


def _layout_name(w: _Weight) -> str:
    return _short(w.layout) if isinstance(w.layout, LegacyObject) else "unknown layout"


def _int8_act_kwargs(w: _Weight) -> Any:
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


def _intx_act(w: _Weight) -> Any:
    """IntxUnpackedToInt8Tensor's activation quantization for the legacy input_quant_func."""
    if w.act is None:
        return None
    if w.act != "_int8_asymm_per_token_quant":
        raise UnsupportedTensorError(
            f"{w.where} pairs intx weights with torchao<=0.17 {w.act}; torchao 0.18 only has int8 "
            "asymmetric per-token activations for intx weights; re-quantize with torchao>=0.18"
        )
    return IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN.value  # the plain str 0.18 stores


def _intx_from_int8(w: _Weight, q: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """IntxUnpackedToInt8Tensor from signed values already in int8 (same dequantize_affine math)."""
    scale = w.per_block(w.tensor("scale"), "scale")
    zero = torch.zeros(w.blocks(), dtype=torch.int8) if zero is None else w.per_block(zero, "zero_point")
    return IntxUnpackedToInt8Tensor(q, scale, zero, getattr(torch, f"int{bits}"), w.block_size, w.dtype,
                                    _intx_act(w))


def _bits_of_range(w: _Weight, signed: bool) -> int:
    """The bit width a legacy quant_min/quant_max pair describes (8 when the record left it None)."""
    lo, hi = w.quant_range
    if lo is None and hi is None:
        return 8
    for bits in range(1, 9):
        if (lo, hi) == ((-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)):
            return bits
    raise UnsupportedTensorError(f"{w.where} has the legacy quant range {lo}..{hi}, which no current tensor holds")


def _from_plain(w: _Weight) -> torch.Tensor:
    """PlainLayout: int8 values -> Int8Tensor; a narrower signed range -> IntxUnpackedToInt8Tensor."""
    q = w.tensor("int_data")
    if q.dtype != torch.int8:
        raise UnsupportedTensorError(f"{w.where}: legacy PlainLayout data of dtype {q.dtype} has no current tensor")
    return _from_int8_values(w, q)


def _from_semi_sparse(w: _Weight) -> torch.Tensor:
    """SemiSparseLayout: cuSPARSELt-compressed 2:4 int8 -> the same values dense, as PlainLayout would hold."""
    rows, cols = w.shape
    return _from_int8_values(w, sparse24.cusparselt_to_dense(w.tensor("int_data"), rows, cols, w.where))


def _from_int8_values(w: _Weight, q: torch.Tensor) -> torch.Tensor:
    """Int8Tensor from signed 8-bit values, or IntxUnpackedToInt8Tensor when the range is narrower."""
    bits = _bits_of_range(w, signed=True)
    zero = w.optional("zero_point")
    if bits < 8:
        return _intx_from_int8(w, q, zero, bits)
    if zero is not None and bool(zero.any()):
        raise UnsupportedTensorError(f"{w.where}: asymmetric int8 weights have no torchao 0.18 Int8Tensor form")
    scale = w.per_block(w.tensor("scale"), "scale")
    return Int8Tensor(q, scale, w.block_size, w.dtype, act_quant_kwargs=_int8_act_kwargs(w))


def _from_qdq(w: _Weight) -> torch.Tensor:
    """QDQLayout (ExecuTorch q/dq): signed intx values in int8 -> IntxUnpackedToInt8Tensor."""
    q = w.tensor("int_data")
    if q.dtype != torch.int8:
        raise CorruptCheckpointError(f"{w.where}: legacy QDQLayout data has dtype {q.dtype}, expected int8")
    return _intx_from_int8(w, q, w.optional("zero_point"), _bits_of_range(w, signed=True))


def _unpack_uintx(packed: LegacyTensor, where: str) -> tuple[torch.Tensor, int]:
    """Undo torchao's UintxTensor bit packing (4/2/1-bit shards, torchao.dtypes.uintx.bitpacking)."""
    bits = _get(packed, "bit_width", int, where)
    dim = _get(packed, "pack_dim", int, where)
    if bits not in _UINTX_SHARDS or dim not in (-1, packed.dim() - 1):
        raise UnsupportedTensorError(f"{where}: legacy UintxTensor of {bits} bits packed along dim {dim}")
    out = None
    for shard_bits, shift in _UINTX_SHARDS[bits]:
        shard = _plain(packed, f"int{shard_bits}_shard", where)
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


def _from_uintx(w: _Weight) -> torch.Tensor:
    """UintxLayout (unsigned sub-byte, bit-packed): unpack, shift to signed -> IntxUnpackedToInt8Tensor."""
    packed = _get(w.impl, "int_data", LegacyTensor, w.where)
    values, bits = _unpack_uintx(packed, w.where)
    zero = w.tensor("zero_point")
    if zero.dtype.is_floating_point or w.zero_domain is not ZeroPointDomain.INT:
        raise UnsupportedTensorError(f"{w.where}: uintx weights with a float zero point have no current tensor")
    offset = 1 << (bits - 1)  # (q - z) is unchanged when both move by the same offset
    q = (values.to(torch.int16) - offset).to(torch.int8)
    if int(zero.min()) < 0 or int(zero.max()) >= (1 << bits):
        raise CorruptCheckpointError(f"{w.where}: uintx zero points outside 0..{(1 << bits) - 1}")
    return _intx_from_int8(w, q, (zero.to(torch.int16) - offset).to(torch.int8), bits)


def _weight_only(w: _Weight) -> None:
    """Refuse an activation quantization that the weight-only int4 tensors of torchao 0.18 cannot carry."""
    if w.act is not None:
        raise UnsupportedTensorError(
            f"{w.where} pairs int4 weights with torchao<=0.17 activation {w.act}, which no torchao 0.18 int4 "
            "tensor carries; re-quantize the original model with torchao>=0.18"
        )


def _from_marlin_sparse(w: _Weight) -> torch.Tensor:
    """MarlinSparseLayout (2:4 int4, symmetric, zero point 8) -> IntxUnpackedToInt8Tensor of the same values."""
    _weight_only(w)
    n, k = w.shape
    group = _get(w.impl, "group_size", int, w.where)
    if _get(w.impl, "num_bits", int, w.where) != 4 or w.block_size != [1, group] or w.quant_range != (0, 15):
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


def _from_int4_cpu(w: _Weight) -> torch.Tensor:
    """Int4CPULayout -> Int4OpaqueTensor: the same CPU kernel packing, moved over as is."""
    _weight_only(w)
    return Int4OpaqueTensor(w.tensor("packed_weight"), w.tensor("scale_and_zero"), w.block_size,
                            torch.Size(w.shape))


def _from_tensor_core_tiled(w: _Weight) -> torch.Tensor:
    """TensorCoreTiledLayout -> Int4TilePackedTo4dTensor: the same tinygemm packing, moved over as is."""
    _weight_only(w)
    return Int4TilePackedTo4dTensor(w.tensor("packed_weight"), w.tensor("scale_and_zero"), w.block_size,
                                    torch.Size(w.shape))


_FLOAT8_GRANULARITIES = (PerRow, PerTensor)


def _float8_act_kwargs(w: _Weight) -> Any:
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


def _from_float8(w: _Weight) -> torch.Tensor:
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

# Legacy tensor-impl class name -> (torchao 0.18 tensor it becomes, migration).
MIGRATIONS: dict[str, tuple[str, Callable[[_Weight], torch.Tensor]]] = {
    "PlainAQTTensorImpl": ("Int8Tensor | IntxUnpackedToInt8Tensor", _from_plain),
    "QDQTensorImpl": ("IntxUnpackedToInt8Tensor", _from_qdq),
    "_Impl": ("IntxUnpackedToInt8Tensor", _from_qdq),
    "UintxAQTTensorImpl": ("IntxUnpackedToInt8Tensor", _from_uintx),
    "Int4CPUAQTTensorImpl": ("Int4OpaqueTensor", _from_int4_cpu),
    "TensorCoreTiledAQTTensorImpl": ("Int4TilePackedTo4dTensor", _from_tensor_core_tiled),
    "Float8AQTTensorImpl": ("Float8Tensor", _from_float8),
    "Int4XPUAQTTensorImpl": ("unsupported", _unsupported(
        "its XPU packing and integer zero point were never produced for a test here")),
    "SemiSparseAQTTensorImpl": ("Int8Tensor", _from_semi_sparse),
    "CutlassSemiSparseTensorImpl": ("unsupported", _unsupported("CUTLASS 2:4 float8 packing is CUDA-only")),
    "MarlinSparseAQTTensorImpl": ("IntxUnpackedToInt8Tensor", _from_marlin_sparse),
    "MarlinQQQAQTTensorImpl": ("unsupported", _unsupported("torchao 0.18 has no Marlin QQQ tensor")),
    "GemliteAQTTensorImpl": ("unsupported", _unsupported("the gemlite bit packing is not decoded")),
    "FloatxTensorCoreAQTTensorImpl": ("unsupported", _unsupported("torchao 0.18 has no fp6/floatx tensor")),
    "BlockSparseAQTTensorImpl": ("unsupported", _unsupported("torchao 0.18 has no block-sparse tensor")),
    "Int4PackedTensorImpl": ("unsupported", _unsupported("CUTLASS int4 activation packing is CUDA-only")),
    "DA8W4CPUAQTTensorImpl": ("unsupported", _unsupported("its CPU da8w4 packing is not decoded")),
    "PackedLinearInt8DynamicActivationIntxWeightAQTTensorImpl": ("unsupported", _unsupported(
        "its packing belongs to torchao's optional C++ kernels")),
}


def _kind(obj: Any) -> Role | None:
    """A weight record's role; an autoquant class is an AQT or an activation wrapper by its pickled fields."""
    role = _role(obj)
    if role is Role.AUTOQUANT:
        return Role.ACT if "original_weight_tensor" in obj.legacy_state else Role.AQT
    return role


def _unwrap(name: str, obj: Any) -> tuple[LegacyTensor, LegacyFunction | None, dict[str, Any]]:
    """The AQT record, its activation function (None for weight-only) and that function's kwargs."""
    role = _kind(obj)
    if role is Role.ACT:
        inner = _get(obj, "original_weight_tensor", LegacyTensor, name)
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


def _plan(name: str, obj: Any) -> tuple[_Weight, str, Callable[[_Weight], torch.Tensor]]:
    """The parsed legacy weight, the name of what it becomes and the migration that makes it."""
    aqt, act, act_kwargs = _unwrap(name, obj)
    w = _Weight(aqt, act, name, act_kwargs)
    impl = _short(w.impl)
    if impl not in MIGRATIONS:
        raise UnsupportedTensorError(
            f"{name} uses the legacy torchao layout {impl} ({_layout_name(w)}), which aockpt does not know"
        )
    target, build = MIGRATIONS[impl]
    return w, target, build


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
    if _role(obj) is Role.FLOAT:
        return obj.as_subclass(torch.Tensor).detach()
    w, _, build = _plan(name, obj)
    try:
        return build(w)
    except (AssertionError, ValueError, RuntimeError, TypeError) as e:
        if isinstance(e, (UnsupportedTensorError, CorruptCheckpointError)):
            raise
        raise CorruptCheckpointError(
            f"{name}: the legacy {_short(w.impl)} fields do not form a valid tensor ({e}); the file is corrupt"
        ) from e


def migrate_state_dict(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A state dict with every legacy record migrated and every other tensor kept as is."""
    return {k: migrate(k, v) if is_legacy(v) else v for k, v in state_dict.items()}


def describe(obj: Any, name: str = "weight") -> str:
    """One line for ``inspect``: which legacy type and layout it is and what it becomes."""
    if _role(obj) is Role.FLOAT:
        return f"torchao<=0.17 {_short(obj)} {obj.dtype} -> plain tensor"
    w, target, build = _plan(name, obj)
    if target.startswith("Int8Tensor |"):
        target = type(migrate(name, obj)).__name__
    act = f" + {w.act}" if w.act else ""
    return f"torchao<=0.17 AffineQuantizedTensor/{_layout_name(w)} {w.impl.dtype}{act} -> {target}"
