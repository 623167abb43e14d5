"""Inert stand-ins for the classes torchao 0.7-0.17 pickled: what the allowlist registers under their old names."""

from __future__ import annotations

import enum
from typing import Any

import torch

from .. import registry  # noqa: F401  (registry imports torchao quietly before the names below)
from ..errors import CorruptCheckpointError, UnsupportedTensorError
from torchao.quantization.quant_primitives import TorchAODType, ZeroPointDomain  # noqa: E402

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
ACTIVATION_CASTS = ("_identity", "_to_bfloat16", "_to_float16")

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
    **{f"{_AQ}.{f}": Role.FUNCTION for f in ACTIVATION_CASTS},
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


def role_of(obj: Any) -> Role | None:
    """The role of a stand-in instance, None for anything else."""
    return LEGACY_GLOBALS.get(getattr(type(obj), "legacy_name", None))


def short_name(obj: Any) -> str:
    """The legacy class name without its module."""
    return type(obj).legacy_name.rsplit(".", 1)[1]
