"""The packed checkpoint's on-disk layout: keys, header records, shard plan and index.

Pure functions on dicts and strings (no file or tensor I/O), so every rule here is testable alone.
A packed checkpoint is a Hugging Face style folder: ``model.safetensors`` or shards plus
``model.safetensors.index.json``. Each shard's header metadata holds torchao's own records (so stock
torchao/transformers can read it) and one aockpt record (``RECORD_KEY``) that aockpt's reader follows.
See docs/format.md.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CorruptCheckpointError, UnsupportedTensorError
from .filenames import INDEX_NAME, WEIGHTS_NAME  # noqa: F401 - the format's file names, read as fmt.*
from .registry import DTYPES, Portability, TensorType, tensor_type_named
from .typed_json import dumps, fits_int64, load_file, loads_strict

FORMAT_VERSION = "1.1.0"
RECORD_KEY = "aockpt"  # no "." in it: transformers reads dotted metadata keys as parameter names
DIGEST = "sha256"
SHARD_PATTERN = "model{suffix}.safetensors"
# Keys the format itself uses in a shard header (safetensors' metadata slot, transformers' and torchao's
# metadata keys, aockpt's record): a tensor under one of these names would overwrite or be read as them.
RESERVED_NAMES = frozenset({"__metadata__", "format", "tensor_names", RECORD_KEY})
_SEMVER = re.compile(r"^(\d{1,9})\.(\d{1,9})\.(\d{1,9})$")  # bounded: int() of 5000 digits raises
_PORTABILITIES = frozenset(p.value for p in Portability)


@dataclass
class PartEntry:
    """One stored inner tensor of a tensor: its key in the file, declared dtype/shape, digest."""

    key: str
    dtype: str
    shape: list[int]
    digest: str


@dataclass
class TensorEntry:
    """Everything aockpt records about one logical tensor."""

    type: str
    shape: list[int]
    dtype: str
    device: str
    portability: str
    packer: str | None
    parts: dict[str, PartEntry]
    attrs: dict[str, Any]
    alias_of: str | None = None


@dataclass
class Record:
    """The aockpt header record of one shard."""

    format_version: str
    producer: dict[str, str]
    tensors: dict[str, TensorEntry] = field(default_factory=dict)


def part_key(name: str, inner: str) -> str:
    """The torchao/transformers key of a part: ``<module>._<param>_<inner>``."""
    module, _, param = name.rpartition(".")
    return f"{module}._{param}_{inner}" if module else f"_{param}_{inner}"


def stored_key(row: TensorType, name: str, inner: str) -> str:
    """The one key a part is stored under, the key stock torchao and transformers read it from: a plain
    tensor's own name, else ``part_key``."""
    return name if row.own_key else part_key(name, inner)


def check_record_keys(record: Record, keys: list[str], where: str) -> None:
    """Refuse a record that stock readers would read differently: a part not under its convention key
    (swapped, renamed or edited parts maps), or another key stock torchao's prefix scan would take.

    `keys` are what stock torchao scans, sorted and each once: every stored key and metadata key.
    """
    for name, entry in record.tensors.items():
        row = None if entry.alias_of is not None else tensor_type_named(entry.type, name)
        for inner, part in ({} if row is None else entry.parts).items():
            expected = stored_key(row, name, inner)
            if part.key != expected:
                raise CorruptCheckpointError(
                    f"{where}: the record maps tensor {name!r} part {inner!r} to key {part.key!r}, but stock torchao "
                    f"and transformers read it from {expected!r}; the record was edited or damaged: re-pack the "
                    "checkpoint from its source"
                )
    clash = prefix_clash(record.tensors, keys)
    if clash is not None:
        raise CorruptCheckpointError(
            f"{where}: key {clash[1]!r} starts with the prefix of tensor {clash[0]!r}, so stock torchao would read "
            "a different tensor than aockpt; rename one of them and re-pack"
        )


def prefix_clash(tensors: dict[str, TensorEntry], ordered: list[str]) -> tuple[str, str] | None:
    """A (tensor, key) pair where stock torchao, which collects a subclass's parts as every key starting with
    ``<module>._<param>_``, would take a key that is not one of that tensor's parts; None if there is none.
    `ordered` holds every key stock torchao sees, sorted and each once."""
    for name, entry in tensors.items():
        if entry.alias_of is not None or not tensor_type_named(entry.type, name).quantized:
            continue
        own, prefix = {p.key for p in entry.parts.values()}, part_key(name, "")
        at = bisect_left(ordered, prefix)
        while at < len(ordered) and ordered[at].startswith(prefix):
            if ordered[at] not in own:
                return name, ordered[at]
            at += 1
    return None


def check_not_reserved(names: list[str]) -> None:
    """Refuse tensor names or stored keys that collide with the format's own header keys, naming each one."""
    clash = sorted(set(names) & RESERVED_NAMES)
    if clash:
        raise UnsupportedTensorError(
            f"tensor name(s) {', '.join(map(repr, clash))} collide with keys the checkpoint format reserves "
            f"({', '.join(sorted(RESERVED_NAMES))}); rename them in the state dict before packing"
        )


def record_to_json(record: Record) -> str:
    """Serialise a record deterministically."""
    tensors = {}
    for name, entry in record.tensors.items():
        if entry.alias_of is not None:
            tensors[name] = {"alias_of": entry.alias_of}
            continue
        tensors[name] = {
            "type": entry.type, "shape": entry.shape, "dtype": entry.dtype, "device": entry.device,
            "portability": entry.portability, "packer": entry.packer, "attrs": entry.attrs,
            "parts": {k: {"key": p.key, "dtype": p.dtype, "shape": p.shape, "digest": p.digest}
                      for k, p in entry.parts.items()},
        }
    return dumps({"format_version": record.format_version, "producer": record.producer,
                  "digest": DIGEST, "tensors": tensors})


def _expect(obj: Any, keys: set[str], where: str) -> dict[str, Any]:
    """A JSON object with exactly these keys; unknown or missing keys are errors."""
    if not isinstance(obj, dict) or set(obj) != keys:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise CorruptCheckpointError(f"{where}: expected keys {sorted(keys)}, got {got}")
    return obj


def _shape(value: Any, where: str) -> list[int]:
    """A shape: a list of non-negative ints whose product torch can hold (int64)."""
    if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
        raise CorruptCheckpointError(f"{where}: shape must be a list of non-negative ints, got {str(value)[:80]}")
    if not fits_int64(value):
        raise CorruptCheckpointError(f"{where}: shape {str(value)[:80]} has more elements than torch can address")
    return value



def _str(value: Any, where: str, allowed: Any = None) -> str:
    """A string, optionally from an allowed set."""
    if not isinstance(value, str) or (allowed is not None and value not in allowed):
        raise CorruptCheckpointError(f"{where}: unexpected value {value!r}")
    return value


def check_version(version: Any, where: str) -> str:
    """Accept every 1.x format; refuse newer majors with advice to upgrade."""
    match = _SEMVER.match(version) if isinstance(version, str) else None
    if match is None:
        raise CorruptCheckpointError(f"{where}: format_version {str(version)[:40]!r} is not semver")
    if int(match.group(1)) != int(FORMAT_VERSION.split(".")[0]):
        raise CorruptCheckpointError(
            f"{where}: format {version} is not readable by this aockpt (reads {FORMAT_VERSION.split('.')[0]}.x); "
            "upgrade aockpt"
        )
    return version


def _entry_from_json(name: str, obj: Any, where: str) -> TensorEntry:
    """One tensor entry, every field checked."""
    here = f"{where}: tensor {name!r}"
    if isinstance(obj, dict) and set(obj) == {"alias_of"}:
        return TensorEntry("", [], "", "", "", None, {}, {}, alias_of=_str(obj["alias_of"], here))
    obj = _expect(obj, {"type", "shape", "dtype", "device", "portability", "packer", "attrs", "parts"}, here)
    parts = obj["parts"]
    if not isinstance(parts, dict) or not parts:
        raise CorruptCheckpointError(f"{here}: parts must be a non-empty object")
    if not isinstance(obj["attrs"], dict):
        raise CorruptCheckpointError(f"{here}: attrs must be an object")
    if obj["packer"] is not None:
        _str(obj["packer"], here)
    tensor_type_named(_str(obj["type"], here), here)
    return TensorEntry(
        type=obj["type"], shape=_shape(obj["shape"], here),
        dtype=_str(obj["dtype"], here, DTYPES), device=_str(obj["device"], here),
        portability=_str(obj["portability"], here, _PORTABILITIES),
        packer=obj["packer"], attrs=obj["attrs"],
        parts={inner: _part_from_json(p, f"{here} part {inner!r}") for inner, p in parts.items()},
    )


def _part_from_json(obj: Any, where: str) -> PartEntry:
    """One part entry, every field checked."""
    obj = _expect(obj, {"key", "dtype", "shape", "digest"}, where)
    return PartEntry(_str(obj["key"], where), _str(obj["dtype"], where, DTYPES),
                     _shape(obj["shape"], where), _str(obj["digest"], where))


def record_from_json(text: str, where: str) -> Record:
    """Parse and check an aockpt record from a file header."""
    obj = _expect(loads_strict(text, where), {"format_version", "producer", "digest", "tensors"}, where)
    check_version(obj["format_version"], where)
    if obj["digest"] != DIGEST:
        raise CorruptCheckpointError(f"{where}: unknown digest algorithm {obj['digest']!r}")
    producer = obj["producer"]
    if not isinstance(producer, dict) or not all(isinstance(v, str) for v in producer.values()):
        raise CorruptCheckpointError(f"{where}: producer must map names to version strings")
    if not isinstance(obj["tensors"], dict):
        raise CorruptCheckpointError(f"{where}: tensors must be an object")
    tensors = {name: _entry_from_json(name, e, where) for name, e in obj["tensors"].items()}
    return Record(obj["format_version"], producer, tensors)


def torchao_record(entry: TensorEntry, torchao_attrs: dict[str, Any]) -> str:
    """torchao's per-tensor JSON record (``_type``/``_data``/``_tensor_data_names``) for stock readers."""
    if not tensor_type_named(entry.type, entry.type).quantized:
        return dumps({"_type": entry.type})
    return dumps({"_type": entry.type, "_data": torchao_attrs, "_tensor_data_names": sorted(entry.parts)})


def shard_metadata(record: Record, torchao_records: dict[str, str]) -> dict[str, str]:
    """Header metadata of one shard: transformers' keys, torchao's records (of every tensor in the checkpoint,
    so a reader of any one shard's metadata sees them all) and this shard's aockpt record."""
    return {"format": "pt", "tensor_names": dumps(sorted(torchao_records)), **torchao_records,
            RECORD_KEY: record_to_json(record)}


def check_shard_name(name: Any, where: str) -> str:
    """A shard file name from an index must be a plain file name inside the folder."""
    if (not isinstance(name, str) or not name or "/" in name or "\\" in name or "\x00" in name
            or name in (".", "..") or re.match(r"^[A-Za-z]:", name) or len(name.encode("utf-8", "replace")) > 255):
        raise CorruptCheckpointError(
            f"{where}: shard file name {str(name)[:80]!r} must be a plain file name (at most 255 bytes) inside the "
            "checkpoint folder"
        )
    return name


def index_from_json(text: str | bytes, where: str) -> dict[str, str]:
    """The weight map of a shard index (key -> shard file), with every shard name checked."""
    return _weight_map(loads_strict(text, where), where)


def _weight_map(obj: Any, where: str) -> dict[str, str]:
    """The checked weight map of a parsed index."""
    if not isinstance(obj, dict) or not isinstance(obj.get("weight_map"), dict):
        raise CorruptCheckpointError(f"{where}: an index needs a 'weight_map' object")
    return {_str(k, where): check_shard_name(v, where) for k, v in obj["weight_map"].items()}


def read_index(path: Path) -> dict[str, str]:
    """The weight map of an index file, its size checked before it is read."""
    return _weight_map(load_file(path), str(path))


def index_to_json(weight_map: dict[str, str], total_size: int) -> str:
    """The shard index transformers and huggingface_hub read."""
    return json.dumps({"metadata": {"total_size": total_size, "format": f"aockpt-{FORMAT_VERSION}"},
                       "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n"
