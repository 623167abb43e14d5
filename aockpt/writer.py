"""Writing packed checkpoints: tensors -> shards with torchao records plus the aockpt record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from huggingface_hub.serialization import split_state_dict_into_shards_factory

from . import __version__, codec, format as fmt
from .errors import UnsupportedTensorError
from .progress import track
from .registry import DTYPE_NAMES, PLAIN_TENSOR, TENSOR_TYPES, Portability
from .safetensors_io import aligned_order, write_file
from .typed_json import encode

DEFAULT_MAX_SHARD_SIZE = "5GB"


@dataclass
class SourceTensor:
    """A tensor on its way into a packed file, with what is known of where it was made."""

    name: str
    tensor: torch.Tensor
    device: str  # device type it was made on, "unknown" where the source does not say
    packer: str | None  # packer of a pinned layout, None where unknown or not pinned


def producer() -> dict[str, str]:
    """Versions of the software that wrote a file."""
    import torchao

    return {"aockpt": __version__, "torch": torch.__version__, "torchao": torchao.__version__}


def _entry(item: SourceTensor, flat: codec.FlatTensor) -> fmt.TensorEntry:
    """The aockpt record entry of one tensor, digests still empty."""
    portability = TENSOR_TYPES[flat.type_name].portability if flat.type_name != PLAIN_TENSOR else Portability.PORTABLE
    parts = {}
    for inner, part in flat.parts.items():
        key = item.name if flat.type_name == PLAIN_TENSOR else fmt.part_key(item.name, inner)
        parts[inner] = fmt.PartEntry(key, DTYPE_NAMES[part.dtype], list(part.shape), "")
    attrs = {k: encode(v) for k, v in flat.attrs.items()}
    return fmt.TensorEntry(flat.type_name, list(flat.shape), DTYPE_NAMES[flat.dtype], item.device,
                           portability.value, item.packer, parts, attrs)


@dataclass
class _Planned:
    """A tensor ready to be written: its flat form, entry and torchao record attributes."""

    flat: codec.FlatTensor
    entry: fmt.TensorEntry
    torchao_attrs: dict


def _plan(items: list[SourceTensor]) -> tuple[dict[str, _Planned], dict[str, str]]:
    """Flatten every tensor, find aliases, and refuse two parts landing on one key."""
    aliases = codec.aliases([(i.name, i.tensor) for i in items])
    planned: dict[str, _Planned] = {}
    owner: dict[str, str] = {}
    for item in items:
        if item.name in aliases:
            continue
        flat = codec.flatten(item.name, item.tensor)
        entry = _entry(item, flat)
        for part in entry.parts.values():
            if part.key in owner:
                raise UnsupportedTensorError(
                    f"{item.name} and {owner[part.key]} both need the stored key {part.key!r}; rename one of them"
                )
            owner[part.key] = item.name
        planned[item.name] = _Planned(flat, entry, {k: encode(v, tuples=False) for k, v in flat.attrs.items()})
    return planned, aliases


def write_packed(items: Iterable[SourceTensor], dst: Path, *, max_shard_size: int | str | None = None) -> int:
    """Write tensors into folder `dst` as a packed checkpoint; returns the bytes of tensor data."""
    items = sorted(items, key=lambda item: item.name)
    planned, aliases = _plan(items)
    split = split_state_dict_into_shards_factory(
        {name: p.flat.nbytes for name, p in planned.items()}, get_storage_size=int,
        filename_pattern=fmt.SHARD_PATTERN, max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE,
    )
    weight_map: dict[str, str] = {}
    made_by = producer()
    for filename, names in track(split.filename_to_tensors.items(), "packing", len(split.filename_to_tensors)):
        shard_aliases = {a: t for a, t in aliases.items() if t in names}
        _write_shard(dst / filename, {n: planned[n] for n in names}, shard_aliases, made_by)
        weight_map.update({p.key: filename for n in names for p in planned[n].entry.parts.values()})
    if len(split.filename_to_tensors) > 1:
        (dst / fmt.INDEX_NAME).write_text(fmt.index_to_json(weight_map, split.metadata["total_size"]))
    return int(split.metadata["total_size"])


def _write_shard(path: Path, planned: dict[str, _Planned], aliases: dict[str, str], made_by: dict) -> None:
    """One shard: parts in aligned order, header with torchao records and the aockpt record."""
    parts = aligned_order([(p.entry.parts[i].key, t) for p in planned.values() for i, t in p.flat.parts.items()])
    torchao_records = {n: fmt.torchao_record(p.entry, p.torchao_attrs) for n, p in planned.items()}

    def metadata(digests: dict[str, str]) -> dict[str, str]:
        for p in planned.values():
            for part in p.entry.parts.values():
                part.digest = digests[part.key]
        tensors = {n: p.entry for n, p in planned.items()}
        tensors.update({a: fmt.TensorEntry("", [], "", "", "", None, {}, {}, alias_of=t) for a, t in aliases.items()})
        return fmt.shard_metadata(fmt.Record(fmt.FORMAT_VERSION, made_by, tensors), torchao_records)

    write_file(path, parts, metadata)
