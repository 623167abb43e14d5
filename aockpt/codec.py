"""Flatten torchao tensor subclasses into plain tensors plus attributes, and rebuild them exactly.

One generic codec serves every registry entry: it reads torchao's own conventions
(``__tensor_flatten__`` / ``__tensor_unflatten__`` and the ``*_names`` class attributes), so a new
torchao type needs a registry line, not new code here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import CorruptCheckpointError, UnsupportedTensorError, reason
from .registry import (DTYPE_NAMES, OUTER_DTYPES, PLAIN_TENSOR, STORAGE_CODES, VALUE_TYPES, tensor_type_named,
                       tensor_type_of)
from .typed_json import fits_int64

PLAIN_PART = "data"  # the single part of an ordinary tensor


@dataclass
class FlatTensor:
    """A tensor taken apart: its type, outer shape/dtype, plain inner tensors and attribute values."""

    type_name: str
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
    if entry is None:
        check_storable(tensor, name)
        plain = tensor.detach()
        return FlatTensor(PLAIN_TENSOR, tuple(plain.shape), plain.dtype, {PLAIN_PART: plain}, {})
    part_names, attrs = tensor.__tensor_flatten__()
    parts = {}
    for part in part_names:
        inner = getattr(tensor, part)
        if type(inner) not in (torch.Tensor, torch.nn.Parameter):
            raise UnsupportedTensorError(
                f"{name}: inner tensor {part!r} of {entry.name} is a {type(inner).__name__}; "
                "nested tensor subclasses are not supported"
            )
        check_storable(inner, f"{name} part {part!r}")
        parts[part] = inner.detach()
    return FlatTensor(entry.name, tuple(tensor.shape), tensor.dtype, parts, dict(attrs))


def check_names(flat: FlatTensor, where: str) -> None:
    """Refuse parts or attributes that the type does not declare, before any constructor runs."""
    if flat.type_name == PLAIN_TENSOR:
        if set(flat.parts) != {PLAIN_PART} or flat.attrs:
            raise CorruptCheckpointError(f"{where}: a plain tensor must have one part and no attributes")
        return
    required, optional, attr_names = tensor_type_named(flat.type_name, where).inner_names()
    missing = set(required) - set(flat.parts)
    unknown = set(flat.parts) - set(required) - set(optional)
    if missing or unknown:
        raise CorruptCheckpointError(
            f"{where}: {flat.type_name} parts are missing {sorted(missing)} / unexpected {sorted(unknown)}"
        )
    if set(flat.attrs) != set(attr_names):
        raise CorruptCheckpointError(
            f"{where}: {flat.type_name} attributes are {sorted(flat.attrs)}, expected {sorted(attr_names)}"
        )
    hints = _attribute_hints(tensor_type_named(flat.type_name, where).cls)
    for name, value in flat.attrs.items():
        hint = hints.get(name, _NAMED_HINTS.get(name, Any))
        if not _conforms(value, hint):
            raise CorruptCheckpointError(f"{where}: attribute {name}={str(value)[:80]} is not a valid {hint}")
        _check_fields(value, name, where)


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    """Annotated field types of an allowlisted value class (kwargs dataclasses, granularities)."""
    try:
        return typing.get_type_hints(cls, localns=dict(VALUE_TYPES))
    except Exception:
        return {}


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


# Exact part shapes of the unpadded int4 layouts for an (N, K) weight with group size g: kernels index
# them by these, so a transposed or doubled part would compute junk or read out of bounds.
_INT4_PART_SHAPES: dict[str, Callable[[int, int, int], dict[str, tuple[int, ...]]]] = {
    "Int4OpaqueTensor": lambda n, k, g: {"qdata": (n, k // 2), "scale_and_zero": (k // g, n, 2)},
    "Int4Tensor": lambda n, k, g: {"qdata": (n, k // 2), "scale": (k // g, n), "zero_point": (k // g, n)},
    "Int4PreshuffledTensor": lambda n, k, g: {"qdata": (n, k // 2), "group_scale": (k // g, n),
                                              "group_zero": (k // g, n)},
    "Int4PlainInt32Tensor": lambda n, k, g: {"qdata": (n, k // 8), "scale": (k // g, n), "zero_point": (k // g, n)},
}
_INT4_ANY_RANK = frozenset({"Int4Tensor", "Int4PreshuffledTensor"})  # also hold 3-D (expert) weights


def _int4_geometry(flat: FlatTensor, where: str) -> None:
    """An int4 record's `shape` and `block_size` must describe one group size dividing K, and its parts that shape."""
    shape, block = list(flat.attrs.get("shape") or []), flat.attrs.get("block_size")
    ranks = (2, 3) if flat.type_name in _INT4_ANY_RANK else (2,)
    if len(shape) not in ranks or not isinstance(block, (list, tuple)) or len(block) != len(shape):
        raise CorruptCheckpointError(
            f"{where}: {flat.type_name} shape {shape[:4]} with block_size {block} is not a "
            f"{' or '.join(f'{r}-D' for r in ranks)} int4 weight with one block size per dimension"
        )
    *lead, k = shape
    *ones, group = block
    if any(b != 1 for b in ones) or not (type(group) is int and 0 < group <= k and k % group == 0 and k % 8 == 0):
        raise CorruptCheckpointError(
            f"{where}: {flat.type_name} block_size {list(block)} is not [1, ..., group] with a group size dividing "
            f"K={k} (K a multiple of 8); the file is inconsistent: re-export it"
        )
    expected = _INT4_PART_SHAPES.get(flat.type_name)
    if expected is None or len(shape) != 2:
        return
    for name, want in expected(shape[0], k, group).items():
        if name in flat.parts and tuple(flat.parts[name].shape) != want:
            raise CorruptCheckpointError(
                f"{where}: {flat.type_name} part {name!r} is {list(flat.parts[name].shape)}, but a {shape} weight "
                f"with group size {group} stores it as {list(want)}; the file is inconsistent: re-export it"
            )


def check_invariants(flat: FlatTensor, where: str) -> None:
    """What a record must satisfy before any converter or constructor reads it: a float outer dtype, each
    part's dtype from its registry entry, sizes torch can address, and (int4) the geometry of its parts."""
    entry = tensor_type_named(flat.type_name, where)
    if flat.dtype is not None and DTYPE_NAMES.get(flat.dtype) not in OUTER_DTYPES:
        raise CorruptCheckpointError(f"{where}: a {flat.type_name} dequantizes to a float dtype "
                                     f"({', '.join(sorted(OUTER_DTYPES))}), not {DTYPE_NAMES.get(flat.dtype)}")
    for name, part in flat.parts.items():
        allowed = entry.part_dtypes.get(name)
        if allowed and DTYPE_NAMES.get(part.dtype) not in allowed:
            raise CorruptCheckpointError(
                f"{where}: {flat.type_name} part {name!r} is {DTYPE_NAMES.get(part.dtype, part.dtype)}, but it is "
                f"stored as {' or '.join(sorted(allowed))}; the file is corrupt or crafted"
            )
    shape = flat.attrs.get("shape")
    if shape is not None and not fits_int64(shape):
        raise CorruptCheckpointError(f"{where}: shape {str(list(shape))[:80]} has more elements than torch can address")
    if entry.family == "int4":
        _int4_geometry(flat, where)


def check_record(flat: FlatTensor, where: str) -> None:
    """Everything checkable before a converter or constructor reads the record: names, then invariants."""
    check_names(flat, where)
    if flat.type_name != PLAIN_TENSOR:
        check_invariants(flat, where)


def rebuild(flat: FlatTensor, where: str, device: torch.device | None = None) -> torch.Tensor:
    """Put a tensor back together on `device` and check it has the declared shape and dtype."""
    check_record(flat, where)
    parts = {k: v.to(device) if device is not None else v for k, v in flat.parts.items()}
    if flat.type_name == PLAIN_TENSOR:
        tensor = parts[PLAIN_PART]
    else:
        cls = tensor_type_named(flat.type_name, where).cls
        try:
            tensor = cls.__tensor_unflatten__(parts, dict(flat.attrs), flat.shape and torch.Size(flat.shape), None)
        except Exception as e:
            raise CorruptCheckpointError(f"{where}: cannot rebuild {flat.type_name} from its parts ({reason(e)})") from e
    if flat.type_name != PLAIN_TENSOR:
        if DTYPE_NAMES.get(tensor.dtype) not in OUTER_DTYPES:
            raise CorruptCheckpointError(f"{where}: rebuilt {flat.type_name} has dtype {tensor.dtype}; a quantized "
                                         f"tensor dequantizes to {', '.join(sorted(OUTER_DTYPES))}")
        check_part_sizes(flat, tuple(tensor.shape), where)
    declared = (flat.shape, flat.dtype) if flat.shape is not None else (tuple(tensor.shape), tensor.dtype)
    if (tuple(tensor.shape), tensor.dtype) != (tuple(declared[0]), declared[1]):
        raise CorruptCheckpointError(
            f"{where}: rebuilt {flat.type_name} is {DTYPE_NAMES.get(tensor.dtype)} {list(tensor.shape)}, "
            f"but the file declares {DTYPE_NAMES.get(flat.dtype)} {list(flat.shape)}"
        )
    return tensor


@dataclass(frozen=True)
class _Sizes:
    """What a tensor's outer shape and block size imply for the sizes of its parts."""

    elements: int  # values of the outer (dequantized) tensor
    blocks: int | None  # quantization blocks, one scale each; None where the type records no block size
    attrs: dict[str, Any]


def _blocks(shape: tuple[int, ...], block_size: Any, where: str) -> int | None:
    """Blocks of a shape: per-dimension block sizes, or one int counting values along the flattened tensor."""
    if block_size is None:
        return None
    if type(block_size) is int:
        block_size, shape = [block_size], (math.prod(shape),)
    if len(block_size) != len(shape) or not all(type(b) is int and b > 0 for b in block_size):
        raise CorruptCheckpointError(f"{where}: block_size {list(block_size)} does not fit shape {list(shape)}")
    return math.prod(-(-d // b) for d, b in zip(shape, block_size))


def _bits(part: torch.Tensor) -> int:
    """Bits a part stores (packed parts are measured this way)."""
    return part.numel() * part.element_size() * 8


def _count(part: torch.Tensor) -> int:
    """Elements of a part (scales are measured this way)."""
    return part.numel()


def _mx_bits(s: _Sizes) -> int | None:
    """Bits an MX qdata holds: 4 per value for fp4, 8 for fp8, unchecked for other element types."""
    bits = {torch.float4_e2m1fn_x2: 4, torch.float8_e4m3fn: 8, torch.float8_e5m2: 8}.get(s.attrs.get("elem_dtype"))
    return bits and bits * s.elements


_Rule = tuple[Callable[[torch.Tensor], int], Callable[[_Sizes], int | None], bool]  # measure, expected, at least
_PER_BLOCK: _Rule = (_count, lambda s: s.blocks, False)
_BYTE_PER_VALUE: _Rule = (_bits, lambda s: 8 * s.elements, False)
_NIBBLE_PER_VALUE: _Rule = (_bits, lambda s: 4 * s.elements, False)
_PADDED_NIBBLES: _Rule = (_bits, lambda s: 4 * s.elements, True)
_PADDED_PER_BLOCK: _Rule = (_count, lambda s: s.blocks, True)

# family -> part -> rule. Kernels index parts by the outer shape, so a part too small for it is refused
# before the tensor is used; layouts that pad (int4 tinygemm tiles pad K and N, swizzled mx/nvfp4 scales)
# may hold more than the outer shape needs.
PART_SIZE_RULES: dict[str, dict[str, _Rule]] = {
    "int8": {"qdata": _BYTE_PER_VALUE, "scale": _PER_BLOCK, "zero_point": _PER_BLOCK},
    "float8": {"qdata": _BYTE_PER_VALUE, "scale": _PER_BLOCK},
    "intx": {"qdata": _BYTE_PER_VALUE, "scale": _PER_BLOCK, "zero_point": _PER_BLOCK},
    "int4": {"qdata": _PADDED_NIBBLES, "scale": _PADDED_PER_BLOCK, "zero_point": _PADDED_PER_BLOCK,
             "group_scale": _PADDED_PER_BLOCK, "group_zero": _PADDED_PER_BLOCK,
             "scale_and_zero": (_count, lambda s: s.blocks and 2 * s.blocks, True)},
    "mx": {"qdata": (_bits, _mx_bits, False), "scale": _PADDED_PER_BLOCK},
    "nvfp4": {"qdata": _NIBBLE_PER_VALUE, "scale": _PADDED_PER_BLOCK},
    "nf4": {"quantized_data": _NIBBLE_PER_VALUE, "quantized_scalers": _PER_BLOCK, "nf4": (_count, lambda s: 16, False),
            "quantization_factor": (_count, lambda s: s.blocks and s.blocks // s.attrs["scaler_block_size"], False)},
}


def check_part_sizes(flat: FlatTensor, shape: tuple[int, ...], where: str) -> None:
    """Refuse parts whose sizes disagree with the outer shape and block size (see PART_SIZE_RULES)."""
    rules = PART_SIZE_RULES.get(tensor_type_named(flat.type_name, where).family, {})
    try:
        sizes = _Sizes(math.prod(shape), _blocks(shape, flat.attrs.get("block_size"), where), flat.attrs)
        checks = [(name, measure(flat.parts[name]), expected(sizes), at_least)
                  for name, (measure, expected, at_least) in rules.items() if name in flat.parts]
    except (ArithmeticError, TypeError, KeyError) as e:
        raise CorruptCheckpointError(f"{where}: {flat.type_name} attributes do not describe its parts ({e})") from e
    for name, got, want, at_least in checks:
        if want is not None and (got < want if at_least else got != want):
            unit = "bits" if rules[name][0] is _bits else "values"
            raise CorruptCheckpointError(
                f"{where}: {flat.type_name} part {name!r} holds {got} {unit}, but a {list(shape)} tensor with "
                f"block_size {flat.attrs.get('block_size')} needs {'at least ' if at_least else ''}{want}; "
                "the file is inconsistent: re-export it"
            )


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
