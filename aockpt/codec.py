"""Flatten torchao tensor subclasses into plain tensors plus attributes, and rebuild them exactly.

One generic codec serves every registry entry: it reads torchao's own conventions
(``__tensor_flatten__`` / ``__tensor_unflatten__`` and the ``*_names`` class attributes), so a new
torchao type needs a registry line, not new code here.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CorruptCheckpointError, UnsupportedTensorError
from .registry import DTYPE_NAMES, PLAIN_TENSOR, tensor_type_named, tensor_type_of

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


def flatten(name: str, tensor: torch.Tensor) -> FlatTensor:
    """Take a tensor apart without copying its inner tensors."""
    entry = tensor_type_of(tensor, name)
    if entry is None:
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
            raise CorruptCheckpointError(f"{where}: attribute {name}={value!r} is not a valid {hint}")


# Expected types of attributes that torchao classes leave unannotated, by attribute name.
_INT_SEQ = typing.Union[typing.List[int], int]
_NAMED_HINTS: dict[str, Any] = {
    "block_size": _INT_SEQ, "shape": typing.List[int], "dtype": typing.Optional[torch.dtype],
    "orig_dtype": torch.dtype, "elem_dtype": torch.dtype, "target_dtype": torch.dtype,
}


def _attribute_hints(cls: type) -> dict[str, Any]:
    """Annotated constructor argument types of a torchao class (``__init__`` and ``__new__`` merged)."""
    hints: dict[str, Any] = {}
    for fn in (cls.__new__, cls.__init__):
        try:
            hints.update(typing.get_type_hints(fn))
        except Exception:
            continue
    return hints


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


def rebuild(flat: FlatTensor, where: str, device: torch.device | None = None) -> torch.Tensor:
    """Put a tensor back together on `device` and check it has the declared shape and dtype."""
    check_names(flat, where)
    parts = {k: v.to(device) if device is not None else v for k, v in flat.parts.items()}
    if flat.type_name == PLAIN_TENSOR:
        tensor = parts[PLAIN_PART]
    else:
        cls = tensor_type_named(flat.type_name, where).cls
        try:
            tensor = cls.__tensor_unflatten__(parts, dict(flat.attrs), flat.shape and torch.Size(flat.shape), None)
        except Exception as e:
            raise CorruptCheckpointError(f"{where}: cannot rebuild {flat.type_name} from its parts ({e})") from e
    declared = (flat.shape, flat.dtype) if flat.shape is not None else (tuple(tensor.shape), tensor.dtype)
    if (tuple(tensor.shape), tensor.dtype) != (tuple(declared[0]), declared[1]):
        raise CorruptCheckpointError(
            f"{where}: rebuilt {flat.type_name} is {DTYPE_NAMES.get(tensor.dtype)} {list(tensor.shape)}, "
            f"but the file declares {DTYPE_NAMES.get(flat.dtype)} {list(flat.shape)}"
        )
    return tensor


def identity(tensor: torch.Tensor) -> tuple | None:
    """What makes two state-dict values one stored tensor (tied weights); None for empty tensors."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter):
        if tensor.numel() == 0:
            return None
        return ("plain", tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                tuple(tensor.shape), tensor.stride(), tensor.dtype)
    return ("subclass", id(tensor))


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
