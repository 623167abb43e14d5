"""Flatten torchao tensor subclasses into plain tensors plus attributes, and rebuild them exactly.

One generic codec serves every registry entry: it reads torchao's own conventions
(``__tensor_flatten__`` / ``__tensor_unflatten__`` and the ``*_names`` class attributes), so a new
torchao type needs a registry line, not new code here.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from typing import Any

import torch

from . import part_sizes
from .errors import CorruptCheckpointError, UnsupportedTensorError, reason
from .registry import DTYPE_NAMES, PLAIN_PART, STORAGE_CODES, VALUE_TYPES, tensor_type_of
from .tensor_type import TensorType
from .typed_json import fits_int64


@dataclass
class FlatTensor:
    """A tensor taken apart: its registry row, outer shape/dtype, plain inner tensors and attribute values."""

    row: TensorType
    shape: tuple[int, ...] | None  # None where a foreign file does not declare it
    dtype: torch.dtype | None
    parts: dict[str, torch.Tensor]
    attrs: dict[str, Any]

    @property
    def nbytes(self) -> int:
        """Bytes the parts occupy on disk."""
        return sum(p.numel() * p.element_size() for p in self.parts.values())


def _unstorable_kind(t: torch.Tensor) -> str | None:
    """What makes a plain tensor impossible to store as one dense run of its own bytes, or None."""
    if t.is_nested:
        return "nested"
    if t.layout != torch.strided:
        return f"sparse ({str(t.layout).removeprefix('torch.')})"
    if t.is_quantized:
        return f"torch-quantized ({str(t.dtype).removeprefix('torch.')})"
    if t.device.type == "meta":
        return "meta (data-less)"
    if t.dtype not in STORAGE_CODES:
        return str(t.dtype).removeprefix("torch.")
    return None


def check_storable(t: torch.Tensor, name: str) -> None:
    """Refuse a plain tensor aockpt cannot store, or whose dense copy would need more bytes than back it.

    Stored tensors are written as dense bytes; a view with overlapping strides (a stride-0 expand) over a
    small storage would make packing allocate far more than the file holds, so it is refused instead.
    """
    kind = _unstorable_kind(t)
    if kind is not None:
        raise UnsupportedTensorError(
            f"{name}: aockpt does not store {kind} tensors; convert it to a dense tensor of a safetensors dtype "
            "(e.g. .to_dense(), .dequantize(), .real) before saving"
        )
    dense, backed = t.numel() * t.element_size(), t.untyped_storage().nbytes()
    if dense > backed:
        raise UnsupportedTensorError(
            f"{name}: a {list(t.shape)} view with strides {list(t.stride())} over {backed} stored bytes would need "
            f"{dense} bytes written out (overlapping or stride-0 strides); aockpt refuses it: save .clone() instead"
        )


def flatten(name: str, tensor: torch.Tensor) -> FlatTensor:
    """Take a tensor apart without copying its inner tensors."""
    entry = tensor_type_of(tensor, name)
    inner_parts, attrs = entry.parts_of(tensor)
    parts = {}
    for part, inner in inner_parts.items():
        if type(inner) not in (torch.Tensor, torch.nn.Parameter):
            raise UnsupportedTensorError(
                f"{name}: inner tensor {part!r} of {entry.name} is a {type(inner).__name__}; "
                "nested tensor subclasses are not supported"
            )
        check_storable(inner, name if inner is tensor else f"{name} part {part!r}")
        parts[part] = inner.detach()
    return FlatTensor(entry, tuple(tensor.shape), tensor.dtype, parts, dict(attrs))


def check_names(flat: FlatTensor, where: str) -> None:
    """Refuse parts or attributes that the type does not declare, before any constructor runs."""
    entry = flat.row
    required, optional, attr_names = entry.inner_names()
    missing = set(required) - set(flat.parts)
    unknown = set(flat.parts) - set(required) - set(optional)
    if missing or unknown:
        raise CorruptCheckpointError(
            f"{where}: {flat.row.name} parts are missing {sorted(missing)} / unexpected {sorted(unknown)}"
        )
    if set(flat.attrs) != set(attr_names):
        raise CorruptCheckpointError(
            f"{where}: {flat.row.name} attributes are {sorted(flat.attrs)}, expected {sorted(attr_names)}"
        )
    hints = _attribute_hints(entry.cls) if flat.attrs else {}
    for name, value in flat.attrs.items():
        hint = hints.get(name, _NAMED_HINTS.get(name, Any))
        if not _conforms(value, hint):
            raise CorruptCheckpointError(f"{where}: attribute {name}={str(value)[:80]} is not a valid {hint}")
        _check_fields(value, name, where)


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    """Annotated field types of an allowlisted value class (kwargs dataclasses, granularities).

    A hint that does not resolve is a bug in the value table, raised here, never a silently skipped check.
    """
    return typing.get_type_hints(cls, localns=dict(VALUE_TYPES))


def _check_fields(value: Any, name: str, where: str) -> None:
    """Every field of an attribute object (and of the objects inside it) must fit its annotation, so a
    kwargs record naming a granularity that is not one is refused before a matmul would trip on it."""
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_fields(item, name, where)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        hints = _field_hints(type(value))
        for f in dataclasses.fields(value):
            inner = getattr(value, f.name)
            if not _conforms(inner, hints.get(f.name, Any)):
                raise CorruptCheckpointError(f"{where}: attribute {name}.{f.name}={str(inner)[:80]} is not a valid "
                                             f"{hints.get(f.name)}; the record is corrupt or crafted")
            _check_fields(inner, f"{name}.{f.name}", where)


# Expected types of attributes that torchao classes leave unannotated, by attribute name.
_INT_SEQ = typing.Union[typing.List[int], int]
_NAMED_HINTS: dict[str, Any] = {
    "block_size": _INT_SEQ, "shape": typing.List[int], "dtype": typing.Optional[torch.dtype],
    "orig_dtype": torch.dtype, "elem_dtype": torch.dtype, "target_dtype": torch.dtype,
}


@functools.cache
def _attribute_hints(cls: type) -> dict[str, Any]:
    """Annotated constructor argument types of a torchao class (``__init__`` and ``__new__`` merged).

    A hint that does not resolve is a bug in the registry entry, raised here, never a silently skipped check.
    """
    return {**typing.get_type_hints(cls.__new__), **typing.get_type_hints(cls.__init__)}


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a decoded attribute value fits a constructor annotation (sequences may be lists or tuples)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, (str, typing.TypeVar)):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin in (list, tuple) or hint is torch.Size:
        item = args[0] if args else int
        return isinstance(value, (list, tuple)) and all(_conforms(v, item) for v in value)
    if hint is int:
        return type(value) is int
    if hint is float:
        return type(value) in (int, float)
    return not isinstance(hint, type) or isinstance(value, hint)


def check_invariants(flat: FlatTensor, where: str) -> None:
    """What a record must satisfy before any converter or constructor reads it: a float outer dtype, each
    part's dtype from its registry entry, sizes torch can address, and (int4) the geometry of its parts."""
    entry = flat.row
    outer = entry.outer_dtypes
    if flat.dtype is not None and outer is not None and DTYPE_NAMES.get(flat.dtype) not in outer:
        raise CorruptCheckpointError(f"{where}: a {flat.row.name} dequantizes to a float dtype "
                                     f"({', '.join(sorted(outer))}), not {DTYPE_NAMES.get(flat.dtype)}")
    for name, part in flat.parts.items():
        allowed = entry.part_dtypes.get(name)
        if allowed and DTYPE_NAMES.get(part.dtype) not in allowed:
            raise CorruptCheckpointError(
                f"{where}: {flat.row.name} part {name!r} is {DTYPE_NAMES.get(part.dtype, part.dtype)}, but it is "
                f"stored as {' or '.join(sorted(allowed))}; the file is corrupt or crafted"
            )
    shape = flat.attrs.get("shape")
    if shape is not None and not fits_int64(shape):
        raise CorruptCheckpointError(f"{where}: shape {str(list(shape))[:80]} has more elements than torch can address")
    if entry.geometry is not None:
        entry.geometry.check(entry.name, flat.parts, flat.attrs, where)


def check_record(flat: FlatTensor, where: str) -> None:
    """Everything checkable before a converter or constructor reads the record: names, then invariants."""
    check_names(flat, where)
    check_invariants(flat, where)


def rebuild(flat: FlatTensor, where: str, device: torch.device | None = None, *, checked: bool = False) -> torch.Tensor:
    """Put a tensor back together on `device` (its parts and device attributes) and check its shape and dtype.

    `checked`: the plan stage already checked this very record (names, attribute types, part dtypes), so
    only what the constructor makes is checked again."""
    if not checked:
        check_record(flat, where)
    parts = {k: v.to(device) if device is not None else v for k, v in flat.parts.items()}
    attrs = {k: on_device(v, device) for k, v in flat.attrs.items()} if device is not None else dict(flat.attrs)
    entry = flat.row
    try:
        tensor = entry.build(entry.cls, parts, attrs, flat.shape and torch.Size(flat.shape))
    except Exception as e:
        raise CorruptCheckpointError(f"{where}: cannot rebuild {flat.row.name} from its parts ({reason(e)})") from e
    if entry.outer_dtypes is not None and DTYPE_NAMES.get(tensor.dtype) not in entry.outer_dtypes:
        raise CorruptCheckpointError(f"{where}: rebuilt {flat.row.name} has dtype {tensor.dtype}; a quantized "
                                     f"tensor dequantizes to {', '.join(sorted(entry.outer_dtypes))}")
    part_sizes.check(entry.part_rules, entry.name, flat.parts, flat.attrs, tuple(tensor.shape), where)
    declared = (flat.shape, flat.dtype) if flat.shape is not None else (tuple(tensor.shape), tensor.dtype)
    if (tuple(tensor.shape), tensor.dtype) != (tuple(declared[0]), declared[1]):
        raise CorruptCheckpointError(
            f"{where}: rebuilt {flat.row.name} is {DTYPE_NAMES.get(tensor.dtype)} {list(tensor.shape)}, "
            f"but the file declares {DTYPE_NAMES.get(flat.dtype)} {list(flat.shape)}"
        )
    return tensor


def on_device(value: Any, device: torch.device) -> Any:
    """An attribute value with every device in it set to `device`, also inside kwargs dataclasses and named
    tuples (NF4's ``tensor_meta``): the one place a load sets the device."""
    if isinstance(value, torch.device):
        return device
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(on_device(v, device) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(on_device(v, device) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: on_device(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def identity(tensor: torch.Tensor) -> tuple | None:
    """What makes two state-dict values one stored tensor (tied weights); None for empty tensors.

    A subclass is identified by its parts' storages and its attributes, never by the wrapper's ``id``:
    ``state_dict()`` hands out a fresh wrapper per name for one tied torchao weight.
    """
    if type(tensor) in (torch.Tensor, torch.nn.Parameter):
        if tensor.numel() == 0:
            return None
        return ("plain", tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                tuple(tensor.shape), tensor.stride(), tensor.dtype)
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None:
        return ("subclass", id(tensor))
    inner, ctx = flatten()
    parts = tuple((n, identity(getattr(tensor, n))) for n in inner)
    if any(p is None for _, p in parts):
        return ("subclass", id(tensor))
    return ("subclass", type(tensor), tuple(tensor.shape), tensor.dtype, parts, repr(ctx))


def aliases(named: list[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """Map each repeated tensor's name to the first name it appeared under."""
    first: dict[tuple, str] = {}
    out = {}
    for name, tensor in named:
        ident = identity(tensor)
        if ident is None:
            continue
        if ident in first:
            out[name] = first[ident]
        else:
            first[ident] = name
    return out
