"""Strict JSON for data read from files, and typed JSON for tensor attribute values.

Attribute values (dtypes, enums, granularities, kwargs dataclasses, tuples, shapes, devices) are written
as ``{"_type": NAME, "_data": ...}`` objects, the same shape torchao's safetensors records use. NAME is
looked up in fixed tables (``registry.VALUE_TYPES``, ``registry.DTYPES``): nothing read from a file is
ever imported or reached with ``getattr``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import CorruptCheckpointError
from .registry import DTYPE_NAMES, DTYPES, VALUE_TYPE_NAMES, VALUE_TYPES

MAX_DEPTH = 16
MAX_FILE_BYTES = 100 * 1024 * 1024  # a JSON file (index, config) or safetensors header is read whole, once
# Arrays, objects and commas outside strings: each becomes at most one Python object. A header of 100k
# tensors has under a million; 99 MB of nested empty lists would have 33 million (~3 GB of objects).
MAX_ITEMS = 4_000_000
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_INT64_MAX = 2**63 - 1
_MARKERS = frozenset({"_type", "_data"})
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_EMPTY_PAIR = re.compile(r"\[\]|\{\}")
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")


def fits_int64(shape: Any) -> bool:
    """Whether every dimension and their product fit torch's int64 sizes (stops multiplying once past)."""
    size = 1
    for dim in shape:
        size *= max(dim, 1)
        if dim > _INT64_MAX or size > _INT64_MAX:
            return False
    return True


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook that refuses duplicate keys instead of keeping the last one."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"duplicate key {duplicate!r}")
    return out


def _no_constant(name: str) -> Any:
    """json hook that refuses NaN and Infinity, which are not JSON."""
    raise ValueError(f"non-standard JSON constant {name}")


def _finite(text: str) -> float:
    """json hook for numbers with a fraction or exponent: `1e999` would silently parse as infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} overflows to {value}")
    return value


def _check_budget(brackets: str, commas: int, where: str) -> None:
    """Refuse JSON that would build more than MAX_ITEMS objects, counted in C before anything is parsed."""
    items = len(brackets) // 2 + commas
    if items > MAX_ITEMS:
        raise CorruptCheckpointError(
            f"{where}: JSON with {items:,} arrays, objects and items, more than the {MAX_ITEMS:,} any real "
            "checkpoint needs; refused before parsing"
        )


def _check_depth(brackets: str, where: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH: each pass drops the innermost bracket pairs, in C, never recursing."""
    for _ in range(MAX_DEPTH):
        brackets = _EMPTY_PAIR.sub("", brackets)
        if not brackets:
            return
    raise CorruptCheckpointError(f"{where}: JSON nested deeper than {MAX_DEPTH} levels")


def loads_strict(text: str | bytes, where: str, parse_int: Callable[[str], Any] = int) -> Any:
    """Parse JSON from a file: UTF-8, bounded item count, no duplicate keys, no NaN/Infinity, no lone
    surrogates, bounded nesting; `parse_int` turns each integer literal into a value (safetensors headers
    refuse `-0`)."""
    try:
        text = bytes(text).decode("utf-8") if isinstance(text, (bytes, bytearray, memoryview)) else text
    except UnicodeError as e:
        raise _invalid(where, e) from e
    bare = _STRING.sub('""', text)
    brackets = _NOT_BRACKET.sub("", bare)  # outside strings: each bracket pair is at most one Python object
    _check_budget(brackets, bare.count(","), where)
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant, parse_float=_finite,
                           parse_int=parse_int)
        if _SURROGATE.search(text):  # a lone "\ud800" cannot be written back as UTF-8
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError, UnicodeError) as e:
        raise _invalid(where, e) from e
    _check_depth(brackets, where)
    return value


def _invalid(where: str, e: Exception) -> CorruptCheckpointError:
    """The one line for bytes that are not strict JSON."""
    return CorruptCheckpointError(f"{where}: invalid JSON ({e}); the file is damaged or not an aockpt file")


def load_file(path: Path, where: str | None = None) -> Any:
    """A JSON file a folder holds (index, config), size-checked before a byte is read, then loads_strict."""
    where = where or str(path)
    try:
        size = os.stat(path).st_size
        if size > MAX_FILE_BYTES:
            raise CorruptCheckpointError(f"{where} is {size:,} bytes, larger than the {MAX_FILE_BYTES:,} a JSON "
                                         "index or config may have; refused without reading it")
        data = Path(path).read_bytes()
    except OSError as e:
        raise CorruptCheckpointError(f"cannot read {where}: {e.strerror}") from e
    return loads_strict(data, where)


def dumps(value: Any) -> str:
    """Deterministic compact JSON for headers (sorted keys, no NaN)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def encode(value: Any, *, tuples: bool = True) -> Any:
    """Turn an attribute value into typed JSON; tuples=False writes tuples as lists, as torchao does."""
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is float:
        if not math.isfinite(value):
            raise ValueError(f"attribute value {value} is not finite")
        return value
    if isinstance(value, torch.dtype):
        return {"_type": "torch.dtype", "_data": DTYPE_NAMES[value]}
    if isinstance(value, torch.device):
        return {"_type": "torch.device", "_data": value.type}
    if isinstance(value, torch.Size):
        return _sequence("torch.Size", value, tuples)
    name = VALUE_TYPE_NAMES.get(type(value))
    if name is not None and isinstance(value, enum.Enum):
        return {"_type": name, "_data": value.name}
    if name is not None:
        return {"_type": name, "_data": {k: encode(v, tuples=tuples) for k, v in _fields(value).items()}}
    if isinstance(value, tuple):
        return _sequence("tuple", value, tuples)
    if isinstance(value, list):
        return [encode(v, tuples=tuples) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value) and "_type" not in value:
        return {k: encode(v, tuples=tuples) for k, v in value.items()}
    raise TypeError(f"cannot encode attribute value of type {type(value).__qualname__}")


def _sequence(type_name: str, value: tuple, tuples: bool) -> Any:
    """A tuple-like value as a typed list, or a bare list in torchao's dialect."""
    items = [encode(v, tuples=tuples) for v in value]
    return {"_type": type_name, "_data": items} if tuples else items


def _fields(value: Any) -> dict[str, Any]:
    """Field values of a dataclass or NamedTuple from the allowlist."""
    if dataclasses.is_dataclass(value):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return dict(value._asdict())


def _field_names(cls: type) -> tuple[str, ...]:
    """Declared field names of an allowlisted dataclass or NamedTuple."""
    if dataclasses.is_dataclass(cls):
        return tuple(f.name for f in dataclasses.fields(cls))
    return tuple(cls._fields)


def decode(value: Any, where: str) -> Any:
    """Rebuild an attribute value from typed JSON; ``torch.device`` values are the CPU until the build stage
    sets the target (``codec.rebuild``): a recorded device is where a tensor was made, not where it goes."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [decode(v, where) for v in value]
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"{where}: unexpected JSON value {value!r}")
    if "_type" not in value:
        return {k: decode(v, where) for k, v in value.items()}
    if set(value) != _MARKERS:
        raise CorruptCheckpointError(f"{where}: typed value has keys {sorted(value)}, expected _type and _data")
    return _decode_typed(value["_type"], value["_data"], where)


def _decode_typed(type_name: Any, data: Any, where: str) -> Any:
    """Dispatch one ``{"_type", "_data"}`` object through the fixed tables."""
    simple = _SIMPLE_DECODERS.get(type_name) if isinstance(type_name, str) else None
    if simple is not None:
        return simple(data, where)
    cls = VALUE_TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise CorruptCheckpointError(f"{where}: attribute type {type_name!r} is not in aockpt's allowlist")
    if issubclass(cls, enum.Enum):
        if not isinstance(data, str) or data not in cls.__members__:
            raise CorruptCheckpointError(f"{where}: {data!r} is not a member of {type_name}")
        return cls.__members__[data]
    expected = _field_names(cls)
    if not isinstance(data, dict) or set(data) - set(expected):
        raise CorruptCheckpointError(
            f"{where}: {type_name} takes fields {list(expected)}, got {sorted(data) if isinstance(data, dict) else data!r}"
        )
    kwargs = {k: decode(v, where) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except Exception as e:
        raise CorruptCheckpointError(f"{where}: invalid {type_name} fields ({e})") from e


def _decode_dtype(data: Any, where: str) -> torch.dtype:
    """A dtype by its name in the DTYPES table."""
    if not isinstance(data, str) or data not in DTYPES:
        raise CorruptCheckpointError(f"{where}: unknown dtype {data!r}")
    return DTYPES[data][0]


def _decode_device(data: Any, where: str) -> torch.device:
    """The CPU, standing for the load target that codec.rebuild sets."""
    if not isinstance(data, str):
        raise CorruptCheckpointError(f"{where}: device must be a string, got {data!r}")
    return torch.device("cpu")


def _decode_sequence(ctor: type) -> Any:
    """Decoder for tuple-like typed lists (tuple, torch.Size)."""

    def decode_seq(data: Any, where: str) -> Any:
        if not isinstance(data, list):
            raise CorruptCheckpointError(f"{where}: {ctor.__name__} must hold a list, got {data!r}")
        items = [decode(v, where) for v in data]
        if ctor is torch.Size and not (all(type(i) is int and i >= 0 for i in items) and fits_int64(items)):
            raise CorruptCheckpointError(f"{where}: torch.Size must hold non-negative ints torch can address, "
                                         f"got {str(items)[:80]}")
        return ctor(items)

    return decode_seq


_SIMPLE_DECODERS = {
    "torch.dtype": _decode_dtype,
    "torch.device": _decode_device,
    "tuple": _decode_sequence(tuple),
    "torch.Size": _decode_sequence(torch.Size),
}
