"""Opening safetensors checkpoints (aockpt-packed, torchao/transformers-written, or plain) as tensor entries.

aockpt files are followed through their explicit part map; torchao files through the exact keys their
``_tensor_data_names`` imply; no structure is ever recovered by scanning key prefixes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import codec, format as fmt
from .errors import CorruptCheckpointError
from .paths import member
from .registry import DTYPE_NAMES, DTYPES, PLAIN, known_type, tensor_type_named
from .fetch import ByteFile, LocalFile
from .safetensors_io import SafetensorsFile
from .typed_json import decode, encode, loads_strict



class Flavor(str, enum.Enum):
    """Which writer made a safetensors checkpoint (the value is how `inspect` names it)."""

    PACKED = "aockpt"
    TORCHAO = "torchao>=0.15 safetensors (transformers 5 / flatten_tensor_state_dict)"
    TORCHAO_014 = "torchao 0.14 safetensors (keys name:inner, unreadable by torchao >= 0.15)"
    PLAIN = "plain safetensors"



@dataclass
class Checkpoint:
    """An opened safetensors checkpoint: shards, where each key lives, and one entry per tensor."""

    path: Path
    flavor: Flavor
    shards: dict[str, SafetensorsFile]
    key_to_shard: dict[str, str]
    entries: dict[str, fmt.TensorEntry]
    producer: dict[str, str] = field(default_factory=dict)
    format_version: str | None = None
    omitted: list[str] = field(default_factory=list)  # listed by torchao's records, no part stored (tied)

    def part(self, key: str) -> torch.Tensor:
        """The stored tensor under `key`, from whichever shard holds it."""
        return self.shards[self.key_to_shard[key]].tensor(key)

    def shape_only(self, key: str) -> torch.Tensor:
        """The stored tensor under `key` as a shape-only (meta) tensor: its dtype and shape, no bytes."""
        slot = self.shards[self.key_to_shard[key]].slots[key]
        return torch.empty(slot.shape, dtype=slot.dtype, device="meta")

    def raw(self, key: str) -> memoryview:
        """The stored bytes under `key`."""
        return self.shards[self.key_to_shard[key]].raw_bytes(key)

    def resolve(self, name: str) -> str:
        """The name whose data a (possibly aliased) tensor name refers to."""
        return self.entries[name].alias_of or name

    def close(self) -> None:
        """Release every shard file."""
        for shard in self.shards.values():
            shard.close()


def shard_files(path: Path) -> tuple[Path, dict[str, str] | None]:
    """The folder and its index weight map (None for a single file), every shard kept inside the folder."""
    if path.is_file():
        return path.parent, None
    if not path.is_dir():
        raise CorruptCheckpointError(f"{path} does not exist")
    index = path / fmt.INDEX_NAME
    if index.is_file():
        weight_map = fmt.read_index(member(path, fmt.INDEX_NAME))
        for name in set(weight_map.values()):
            if not member(path, name).is_file():
                raise CorruptCheckpointError(f"{index}: shard {name!r} is missing")
        return path, weight_map
    if member(path, fmt.WEIGHTS_NAME).is_file():
        return path, None
    raise CorruptCheckpointError(f"{path} holds neither {fmt.WEIGHTS_NAME} nor {fmt.INDEX_NAME}")


def is_packed(path: str | Path) -> bool:
    """Whether `path` holds safetensors carrying aockpt's record; a damaged checkpoint raises rather than says no.

    Raises:
        CorruptCheckpointError: the safetensors are there but malformed, so "packed or not" has no answer.
    """
    path = Path(path)
    has_weights = (path.suffix == ".safetensors" if path.is_file()
                   else (path / fmt.INDEX_NAME).is_file() or (path / fmt.WEIGHTS_NAME).is_file())
    if not has_weights:
        return False
    ckpt = open_checkpoint(path, omitted_ok=True)  # tied weights transformers omits do not change the answer
    ckpt.close()
    return ckpt.flavor is Flavor.PACKED


def open_checkpoint(path: str | Path, *, omitted_ok: bool = False,
                    opener: Callable[[Path], ByteFile] = LocalFile) -> Checkpoint:
    """Open and cross-check every shard of a safetensors checkpoint before any tensor is built.

    With `omitted_ok`, tensors torchao's records list but whose parts are all absent (transformers omits
    tied weights so) are set aside in `Checkpoint.omitted` for the caller to resolve; otherwise they are
    an error naming the first one. `opener` gives each shard's bytes (aockpt.fetch.ByteFile; default the
    local file).
    """
    path = Path(path)
    folder, weight_map = shard_files(path)
    names = sorted(set(weight_map.values())) if weight_map else [path.name if path.is_file() else fmt.WEIGHTS_NAME]
    shards: dict[str, SafetensorsFile] = {}
    try:
        for name in names:
            shards[name] = SafetensorsFile(opener(folder / name))
        ckpt = _assemble(path, shards, weight_map)
        if ckpt.omitted and not omitted_ok:
            raise CorruptCheckpointError(f"{path}: {ckpt.omitted[0]} is listed but none of its data is stored; "
                                         "the checkpoint is incomplete: re-download or re-save it")
        return ckpt
    except BaseException:
        for shard in shards.values():
            shard.close()
        raise


def _assemble(path: Path, shards: dict[str, SafetensorsFile], weight_map: dict[str, str] | None) -> Checkpoint:
    """Join shards: each key in exactly one shard, agreeing with the index, every key claimed by a tensor."""
    key_to_shard: dict[str, str] = {}
    for name, shard in shards.items():
        for key in shard.keys():
            if key in key_to_shard:
                raise CorruptCheckpointError(f"{path}: tensor key {key!r} is stored in two shards")
            if weight_map is not None and weight_map.get(key) != name:
                raise CorruptCheckpointError(f"{path}: key {key!r} in {name} is not listed there by the index")
            key_to_shard[key] = name
    if weight_map is not None and set(weight_map) != set(key_to_shard):
        missing = sorted(set(weight_map) - set(key_to_shard))[:5]
        raise CorruptCheckpointError(f"{path}: index lists keys that no shard holds: {missing}")
    flavor = _flavor(shards)
    entries, producer, version = _READERS[flavor](path, shards)
    omitted = _omitted(entries, key_to_shard) if flavor in (Flavor.TORCHAO, Flavor.TORCHAO_014) else []
    ckpt = Checkpoint(path, flavor, shards, key_to_shard, entries, producer, version, omitted)
    _check_parts(ckpt)
    return ckpt


def _omitted(entries: dict[str, fmt.TensorEntry], key_to_shard: dict[str, str]) -> list[str]:
    """Take out the tensors listed with none of their parts stored: transformers omits tied weights so.

    Whether each is really tied is decided by whoever knows the model (``sources.open_source``);
    a tensor with only some of its parts stored stays an error.
    """
    omitted = [n for n, e in entries.items() if e.parts and not any(p.key in key_to_shard for p in e.parts.values())]
    for name in omitted:
        del entries[name]
    return omitted


def _flavor(shards: dict[str, SafetensorsFile]) -> Flavor:
    """Which writer made these shards, from their header metadata; mixed flavors are refused."""
    flavors = set()
    for shard in shards.values():
        meta = shard.metadata
        if fmt.RECORD_KEY in meta:
            flavors.add(Flavor.PACKED)
        elif "tensor_names" in meta:
            flavors.add(Flavor.TORCHAO_014 if any(":" in key for key in shard.keys()) else Flavor.TORCHAO)
        else:
            flavors.add(Flavor.PLAIN)
    if len(flavors) != 1:
        raise CorruptCheckpointError(f"shards were written by different tools ({', '.join(sorted(flavors))})")
    return flavors.pop()


def _read_packed(path: Path, shards: dict[str, SafetensorsFile]) -> tuple[dict, dict, str]:
    """Entries from aockpt records, one per shard."""
    entries: dict[str, fmt.TensorEntry] = {}
    producer, version = {}, None
    keys = sorted({key for shard in shards.values() for key in (*shard.keys(), *shard.metadata)})
    for name, shard in shards.items():
        record = fmt.record_from_json(shard.metadata[fmt.RECORD_KEY], f"{path}/{name}")
        fmt.check_record_keys(record, keys, f"{path}/{name}")
        producer, version = record.producer, record.format_version
        for tensor_name, entry in record.tensors.items():
            if tensor_name in entries:
                raise CorruptCheckpointError(f"{path}: tensor {tensor_name!r} is recorded in two shards")
            entries[tensor_name] = entry
    return entries, producer, version


def _read_torchao(path: Path, shards: dict[str, SafetensorsFile]) -> tuple[dict, dict, None]:
    """Entries from torchao's per-tensor records; part keys computed exactly from `_tensor_data_names`."""
    return _read_torchao_records(path, shards, _torchao_entry)


def _read_torchao_014(path: Path, shards: dict[str, SafetensorsFile]) -> tuple[dict, dict, None]:
    """Entries from torchao 0.14 records: parts under ``name:inner``, plain tensors under ``name:_data``."""
    keys = {key for shard in shards.values() for key in shard.keys()}
    return _read_torchao_records(path, shards, lambda n, r, s, w: _torchao_014_entry(n, r, keys, w))


def _read_torchao_records(path: Path, shards: dict[str, SafetensorsFile],
                          make_entry: Callable[[str, Any, SafetensorsFile, str], fmt.TensorEntry]
                          ) -> tuple[dict, dict, None]:
    """Entries from the per-tensor records listed in each shard's `tensor_names`."""
    entries: dict[str, fmt.TensorEntry] = {}
    for name, shard in shards.items():
        where = f"{path}/{name}"
        tensor_names = loads_strict(shard.metadata["tensor_names"], f"{where} tensor_names")
        if not isinstance(tensor_names, list) or not all(isinstance(n, str) for n in tensor_names):
            raise CorruptCheckpointError(f"{where}: tensor_names must be a list of strings")
        for tensor_name in tensor_names:
            if tensor_name not in shard.metadata:
                raise CorruptCheckpointError(f"{where}: no record for listed tensor {tensor_name!r}")
            record = loads_strict(shard.metadata[tensor_name], f"{where} record {tensor_name!r}")
            entries[tensor_name] = make_entry(tensor_name, record, shard, f"{where} {tensor_name!r}")
    return entries, {}, None


def _torchao_entry(name: str, record: Any, shard: SafetensorsFile, where: str) -> fmt.TensorEntry:
    """One torchao record as an entry; outer shape/dtype are read from the rebuilt tensor later."""
    if not isinstance(record, dict) or "_type" not in record:
        raise CorruptCheckpointError(f"{where}: record has no _type")
    entry_type = known_type(record["_type"])
    if entry_type is not None and entry_type.own_key:
        return _plain_entry(name)
    if entry_type is None or set(record) != {"_type", "_data", "_tensor_data_names"}:
        raise CorruptCheckpointError(f"{where}: unsupported torchao record type {record.get('_type')!r}")
    inner = record["_tensor_data_names"]
    if not isinstance(inner, list) or not all(isinstance(i, str) for i in inner) or not isinstance(record["_data"], dict):
        raise CorruptCheckpointError(f"{where}: malformed _tensor_data_names or _data")
    parts = {i: fmt.PartEntry(fmt.part_key(name, i), "", [], "") for i in inner}
    portability = entry_type.portability.value
    return fmt.TensorEntry(entry_type.name, [], "", "unknown", portability,
                           entry_type.assumed_packer, parts, record["_data"])


def _torchao_014_entry(name: str, record: Any, keys: set[str], where: str) -> fmt.TensorEntry:
    """One torchao 0.14 record; its parts are the declared inner names stored as ``name:inner``."""
    if not isinstance(record, dict) or set(record) - {"_type", "_data"} or "_type" not in record:
        raise CorruptCheckpointError(f"{where}: malformed torchao 0.14 record")
    entry_type = known_type(record["_type"])
    if entry_type is not None and entry_type.own_key:
        return _plain_entry(name, f"{name}:_data")
    if entry_type is None or not isinstance(record.get("_data"), dict):
        raise CorruptCheckpointError(f"{where}: unsupported torchao 0.14 record type {record.get('_type')!r}")
    required, optional, _ = entry_type.inner_names()
    parts = {i: fmt.PartEntry(f"{name}:{i}", "", [], "") for i in (*required, *optional) if f"{name}:{i}" in keys}
    return fmt.TensorEntry(entry_type.name, [], "", "unknown", entry_type.portability.value,
                           entry_type.assumed_packer, parts, record["_data"])


def _plain_entry(name: str, key: str | None = None) -> fmt.TensorEntry:
    """An entry for an ordinary tensor stored under its own name; its dtype and shape are the stored ones."""
    return fmt.TensorEntry(PLAIN.name, [], "", "unknown", PLAIN.portability.value, None,
                           {codec.PLAIN_PART: fmt.PartEntry(key or name, "", [], "")}, {})


def _read_plain(path: Path, shards: dict[str, SafetensorsFile]) -> tuple[dict, dict, None]:
    """Every key of a plain file is an ordinary tensor."""
    entries = {}
    for shard in shards.values():
        for key in shard.slots:
            entries[key] = _plain_entry(key)
    return entries, {}, None


_READERS: dict[str, Callable[[Path, dict[str, SafetensorsFile]], tuple[dict, dict, str | None]]] = {
    Flavor.PACKED: _read_packed,
    Flavor.TORCHAO: _read_torchao,
    Flavor.TORCHAO_014: _read_torchao_014,
    Flavor.PLAIN: _read_plain,
}


def _check_parts(ckpt: Checkpoint) -> None:
    """Every part key exists with its declared dtype/shape, every stored key belongs to one part, aliases resolve."""
    claimed: dict[str, str] = {}
    for name, entry in ckpt.entries.items():
        if entry.alias_of is not None:
            target = ckpt.entries.get(entry.alias_of)
            if target is None or target.alias_of is not None:
                raise CorruptCheckpointError(f"{ckpt.path}: {name!r} is an alias of missing {entry.alias_of!r}")
            continue
        for inner, part in entry.parts.items():
            if part.key not in ckpt.key_to_shard:
                raise CorruptCheckpointError(f"{ckpt.path}: {name} part {inner!r} (key {part.key!r}) is missing")
            if part.key in claimed:
                raise CorruptCheckpointError(f"{ckpt.path}: key {part.key!r} is claimed by {claimed[part.key]} and {name}")
            claimed[part.key] = name
            slot = ckpt.shards[ckpt.key_to_shard[part.key]].slots[part.key]
            if part.dtype and (DTYPES[part.dtype][0] != slot.dtype or list(slot.shape) != part.shape):
                raise CorruptCheckpointError(
                    f"{ckpt.path}: {name} part {inner!r} is declared {part.dtype} {part.shape} but stored as "
                    f"{DTYPE_NAMES.get(slot.dtype)} {list(slot.shape)}"
                )
    unclaimed = sorted(set(ckpt.key_to_shard) - set(claimed))
    if unclaimed:
        raise CorruptCheckpointError(f"{ckpt.path}: stored keys belong to no tensor: {unclaimed[:5]}")


def read_flat(ckpt: Checkpoint, name: str, part: Callable[[str], torch.Tensor] | None = None) -> codec.FlatTensor:
    """A tensor's parts (zero-copy views, or `part(key)` where given) and decoded attributes, for codec.rebuild."""
    entry = ckpt.entries[ckpt.resolve(name)]
    where = f"{ckpt.path}: {name}"
    parts = {inner: (part or ckpt.part)(p.key) for inner, p in entry.parts.items()}
    row = tensor_type_named(entry.type, where)  # the on-disk name, resolved once here
    if row.own_key:  # its one part is the tensor: its shape and dtype
        codec.check_names(codec.FlatTensor(row, None, None, parts, entry.attrs), where)
        tensor = parts[codec.PLAIN_PART]
        return codec.FlatTensor(row, tuple(tensor.shape), tensor.dtype, parts, {})
    attrs = {k: decode(v, where) for k, v in entry.attrs.items()}
    dtype = DTYPES[entry.dtype][0] if entry.dtype else None
    return codec.FlatTensor(row, tuple(entry.shape) if entry.dtype else None, dtype, parts, attrs)


def check_torchao_records(ckpt: Checkpoint) -> None:
    """The torchao records stock loaders read must say exactly what the aockpt record says, in every shard."""
    expected = {}
    for name, entry in ckpt.entries.items():
        if entry.alias_of is None:
            attrs = {k: encode(decode(v, f"{ckpt.path}: {name}"), tuples=False) for k, v in entry.attrs.items()}
            expected[name] = loads_strict(fmt.torchao_record(entry, attrs), name)
    for shard_name, shard in ckpt.shards.items():
        where = f"{ckpt.path}/{shard_name}"
        names = loads_strict(shard.metadata.get("tensor_names", "null"), f"{where} tensor_names")
        if names != sorted(expected):
            raise CorruptCheckpointError(f"{where}: tensor_names does not list exactly the checkpoint's tensors; "
                                         "stock loaders would see different tensors than aockpt verified")
        for name, record in expected.items():
            if loads_strict(shard.metadata.get(name, "null"), f"{where} record {name!r}") != record:
                raise CorruptCheckpointError(
                    f"{where}: torchao's record of {name} disagrees with aockpt's record; stock loaders would "
                    "build a different tensor than aockpt verified; re-pack the checkpoint"
                )
