"""torch.distributed.checkpoint (DCP) for aockpt folders: save from N ranks into one packed folder, load any
packed folder into a state dict sharded for any world size.

DCP moves plain tensors only (torchao 0.18 subclasses fail inside it: ``aten.is_pinned``), so the planners
here hand it each tensor's parts, taken apart by aockpt's codec, under their torchao keys. A rank's slice
from ``aockpt.tp`` becomes chunks of those parts at their offsets in the full parts, so DCP's own
resharding does the rest. Saving builds on DCP's ``HuggingFaceStorageWriter``: ranks write their chunks
to a staging folder; the coordinator assembles the full parts and writes the packed folder once, through
aockpt's writer (records, digests, index). Loading builds on ``HuggingFaceStorageReader`` after aockpt's
reader has validated the folder. See docs/distributed.md.

Example (every rank)::

    dcp.save(state, storage_writer=aockpt.dcp.AockptStorageWriter("packed/"), planner=aockpt.dcp.AockptSavePlanner())
    dcp.load(state, storage_reader=aockpt.dcp.AockptStorageReader("packed/"), planner=aockpt.dcp.AockptLoadPlanner())
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint._hf_utils import CUSTOM_METADATA_KEY, SAVED_OFFSETS_KEY, _HFStorageInfo
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem, SavePlan, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import TensorWriteData, create_read_items_for_chunk_list
from torch.distributed.tensor import DTensor

from . import codec, format as fmt, portability
from .device_load import back_to_back
from .atomic import staged
from .errors import CorruptCheckpointError, KeyMismatchError, UnsupportedTensorError, UsageError
from .load import Shards, SliceInfo
from .plan import check_records
from .registry import PLAIN, tensor_type_named
from .sources import open_source
from .safetensors_io import SafetensorsFile
from .typed_json import loads_strict
from .fetch import page_releaser
from .writer import SourceTensor, write_packed

_RECORDS = "aockpt_records"  # planner_data key carrying the tensors' records to the coordinator
_STAGING = ".aockpt-dcp-staging"


@dataclass
class _Chunk:
    """One rank's piece of one stored part: the local tensor, its offsets in the full part, the full size."""

    local: torch.Tensor
    offsets: tuple[int, ...]
    size: tuple[int, ...]


@dataclass
class _Record:
    """What the coordinator needs to rebuild one full tensor from its assembled parts."""

    type_name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    attrs: dict[str, Any]
    parts: dict[str, str]  # inner name -> part key
    made_on: str
    packer: str | None
    alias_of: str | None = None
    digest: str | None = None  # a whole value's bytes, compared across ranks; None for slices and one process


def _dtensor_pieces(name: str, tensor: DTensor, keys: dict[str, str] | None) -> tuple[_Record, dict[str, _Chunk]]:
    """A DTensor of a plain tensor: its local chunk at DTensor's own offsets."""
    local, (chunk,) = tensor.to_local(), tensor.__create_chunk_list__()
    if type(local) is not torch.Tensor:
        raise UnsupportedTensorError(f"{name}: a DTensor of {type(local).__name__} cannot go through DCP; "
                                     "keep quantized weights as aockpt.tp local tensors")
    key = (keys or {codec.PLAIN_PART: name})[codec.PLAIN_PART]
    return (_Record(PLAIN.name, tuple(tensor.shape), tensor.dtype, {}, {codec.PLAIN_PART: key}, "cpu", None),
            {key: _Chunk(local, tuple(chunk.offsets), tuple(tensor.shape))})


def _pieces(name: str, tensor: Any, keys: dict[str, str] | None = None,
            info: SliceInfo | None = None) -> tuple[_Record, dict[str, _Chunk]]:
    """A state-dict value as a record and its parts' chunks (keys: inner -> part key; default torchao's).

    `info` (from the ``Shards`` that aockpt.tp returned) says where a slice sits; without it the value is whole."""
    if isinstance(tensor, DTensor):
        return _dtensor_pieces(name, tensor, keys)
    if not isinstance(tensor, torch.Tensor):
        raise UsageError(f"{name}: the state dict holds a {type(tensor).__name__}, not a tensor; DCP through aockpt "
                         "saves and fills tensors only")
    flat = codec.flatten(name, tensor)
    offsets_of: dict[str, tuple[int, int, int] | None] = {}
    if info is not None and info.dim is not None:
        if tuple(flat.shape) != tuple(info.local_shape):
            raise UsageError(f"{name}: the state dict holds {list(flat.shape)}, but the slices passed to the "
                             f"planner put a {list(info.local_shape)} slice there; pass the Shards of these tensors")
        if info.parts is None:
            raise UnsupportedTensorError(f"{name}: a re-laid-out int4 slice is not a piece of the stored tensor; "
                                         "save the whole tensor from one rank instead")
        offsets_of = info.parts
    keys = keys or {inner: fmt.stored_key(flat.row, name, inner) for inner in flat.parts}
    if set(keys) != set(flat.parts):
        raise UsageError(f"{name}: the state dict holds a {flat.row.name} with parts {sorted(flat.parts)}, but the "
                         f"checkpoint stores parts {sorted(keys)}; quantize the model with the checkpoint's config first")
    chunks = {}
    for inner, part in flat.parts.items():
        span = offsets_of.get(inner)
        offsets, size = [0] * part.dim(), list(part.shape)
        if span is not None:
            offsets[span[0]], size[span[0]] = span[1], span[2]
        chunks[keys[inner]] = _Chunk(part, tuple(offsets), tuple(size))
    sliced = info is not None and info.dim is not None
    shape = info.full_shape if sliced else tuple(flat.shape)
    attrs = info.full_attrs if sliced else flat.attrs
    packer = portability.packer_here(flat.row) or flat.row.assumed_packer
    return _Record(flat.row.name, shape, flat.dtype, attrs, keys, tensor.device.type, packer), chunks


def _several_ranks() -> bool:
    """Whether this process saves as one of several ranks (only then can a whole value differ between them)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def _digest(flat: codec.FlatTensor) -> str:
    """What a whole value is, byte for byte: its type, shape, attributes and every part."""
    h = hashlib.sha256(repr((flat.row.name, tuple(flat.shape), str(flat.dtype), sorted(flat.attrs.items(),
                                                                                     key=str))).encode())
    for inner, part in sorted(flat.parts.items()):
        data = part.detach().cpu().contiguous()
        h.update(f"{inner}:{list(data.shape)}:{data.dtype}".encode())
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


class AockptSavePlanner(DefaultSavePlanner):
    """Hands DCP the parts of every tensor (whole, or a rank's aockpt.tp slice) and the records to rebuild them.

    `slices`: the ``Shards`` aockpt.tp returned (or its ``.slices``), saying where each rank's slice sits;
    copies of its tensors (``.clone()``, ``.to(...)``, ``nn.Parameter``) keep their place through it. A value
    not placed by it is whole: if it differs between ranks, the save is refused naming it."""

    def __init__(self, slices: Shards | dict[str, SliceInfo] | None = None) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.slices = dict(getattr(slices, "slices", slices) or {})

    def set_up_planner(self, state_dict: dict[str, Any], storage_meta: StorageMeta | None = None,
                       is_coordinator: bool = False) -> None:
        self.records: dict[str, _Record] = {}
        self.chunks: dict[str, _Chunk] = {}
        aliases = codec.aliases([(n, t) for n, t in state_dict.items() if isinstance(t, torch.Tensor)])
        several = _several_ranks()
        for name, tensor in state_dict.items():
            if name in aliases:
                self.records[name] = _Record("", (), tensor.dtype, {}, {}, "", None, alias_of=aliases[name])
                continue
            info = self.slices.get(name)
            self.records[name], chunks = _pieces(name, tensor, info=info)
            self.chunks.update(chunks)
            if several and not isinstance(tensor, DTensor) and (info is None or info.dim is None):
                self.records[name].digest = _digest(codec.flatten(name, tensor))
        super().set_up_planner({}, storage_meta, is_coordinator)

    def create_local_plan(self) -> SavePlan:
        items = [_write_item(key, c) for key, c in self.chunks.items()]
        self.plan = SavePlan(items, planner_data={_RECORDS: self.records})
        return self.plan

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        records: dict[str, _Record] = {}
        differ = []
        for plan in all_plans:
            for name, record in plan.planner_data[_RECORDS].items():
                first = records.setdefault(name, record)
                if first.digest != record.digest and name not in differ:
                    differ.append(name)
        if differ:
            raise UsageError(
                f"{', '.join(differ[:10])}{' and more' if len(differ) > 10 else ''}: saved as whole tensors but "
                "different on each rank (a slice whose place was lost, e.g. a copy of an aockpt.tp slice); pass "
                "AockptSavePlanner(slices=shards) with the Shards aockpt.tp returned, or save them as DTensors"
            )
        plans, metadata = super().create_global_plan(all_plans)
        self.metadata = dataclasses.replace(metadata, planner_data={_RECORDS: records})
        return plans, self.metadata

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        return self.chunks[write_item.index.fqn].local.detach().cpu().contiguous()


def _write_item(key: str, chunk: _Chunk) -> WriteItem:
    """DCP's description of one chunk: a whole part, or a shard of it at its offsets."""
    offsets = torch.Size(chunk.offsets)
    whole = not any(chunk.offsets) and chunk.size == tuple(chunk.local.shape)
    return WriteItem(index=MetadataIndex(key, offsets), type=WriteItemType.TENSOR if whole else WriteItemType.SHARD,
                     tensor_data=TensorWriteData(ChunkStorageMetadata(offsets, chunk.local.size()),
                                                 TensorProperties.create_from_tensor(chunk.local),
                                                 torch.Size(chunk.size)))


class AockptStorageWriter(HuggingFaceStorageWriter):
    """DCP's safetensors writer into a staging folder; the coordinator then writes one packed folder at `path`."""

    def __init__(self, path: str | os.PathLike, *, force: bool = False, max_shard_size: int | str | None = None):
        self.destination, self.force, self.max_shard_size = Path(path), force, max_shard_size
        staging = self.destination.with_name(self.destination.name + _STAGING)
        super().__init__(str(staging), save_distributed=True)

    def finish(self, metadata: Metadata, results: list[list[Any]]) -> None:
        staging = Path(str(self.path))
        try:
            parts = _assemble(staging, metadata)
            records = metadata.planner_data[_RECORDS]
            items = _source_items(records, parts)
            with staged(self.destination, force=self.force) as tmp:
                write_packed(items, tmp, max_shard_size=self.max_shard_size, release_pages=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _assemble(staging: Path, metadata: Metadata) -> dict[str, torch.Tensor]:
    """Every part in full, from the chunks the ranks wrote with their offsets, as views of one staging file.

    Parts are put together one at a time and written out, and the chunk files are deleted, so the
    coordinator holds the largest part, never the checkpoint; the writer releases the views' pages as it
    writes them (`write_packed(release_pages=True)`), as `pack` does with its sources."""
    stored = metadata.state_dict_metadata
    at, end = back_to_back((key, _nbytes(md)) for key, md in stored.items())
    chunk_files = sorted(staging.glob("*.safetensors"))
    assembled = staging / "assembled.bin"
    with ExitStack() as stack, assembled.open("wb") as out:
        chunks_of: dict[str, list[tuple[SafetensorsFile, list[int]]]] = {key: [] for key in stored}
        for path in chunk_files:
            f = stack.enter_context(SafetensorsFile(path))
            offsets = loads_strict(f.metadata[CUSTOM_METADATA_KEY], str(path))
            for key in f.keys():
                chunks_of[key].append((f, offsets[key][SAVED_OFFSETS_KEY]))
        release = page_releaser()
        for key, md in stored.items():
            full = torch.empty(md.size, dtype=md.properties.dtype)
            for f, offsets in chunks_of[key]:
                chunk = f.tensor(key)
                full[tuple(slice(o, o + n) for o, n in zip(offsets, chunk.shape))] = chunk
                release(chunk)
            out.seek(at[key])
            out.write(full.reshape(-1).view(torch.uint8).numpy())
        out.truncate(end)
    for path in chunk_files:
        path.unlink()
    return _views(assembled, stored, at)


def _nbytes(md: TensorStorageMetadata) -> int:
    """Bytes of one full stored part."""
    return md.size.numel() * md.properties.dtype.itemsize


def _views(path: Path, stored: dict[str, TensorStorageMetadata], at: dict[str, int]) -> dict[str, torch.Tensor]:
    """Each part as a view of a private mapping of `path`, never written to, so the writer can drop its pages."""
    mapping = None
    if path.stat().st_size:
        with path.open("rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return {key: torch.frombuffer(mapping, dtype=torch.uint8, count=_nbytes(md), offset=at[key])
            .view(md.properties.dtype).reshape(md.size) if _nbytes(md)
            else torch.empty(md.size, dtype=md.properties.dtype) for key, md in stored.items()}


def _source_items(records: dict[str, _Record], parts: dict[str, torch.Tensor]) -> list[SourceTensor]:
    """Writer items in state-dict order; aliases share their target's tensor object."""
    built: dict[str, torch.Tensor] = {}
    items = []
    for name, record in records.items():
        if record.alias_of is None:
            row = tensor_type_named(record.type_name, f"dcp save: {name}")  # records arrive from ranks by name
            flat = codec.FlatTensor(row, record.shape, record.dtype,
                                    {inner: parts[key] for inner, key in record.parts.items()}, record.attrs)
            built[name] = codec.rebuild(flat, f"dcp save: {name}")
    for name, record in records.items():
        target = record.alias_of or name
        items.append(SourceTensor(name, built[target], records[target].made_on, records[target].packer))
    return items


class AockptStorageReader(HuggingFaceStorageReader):
    """DCP's safetensors reader over an aockpt (or torchao-written) folder, after aockpt validated it."""

    def __init__(self, path: str | os.PathLike, thread_count: int = 1):
        super().__init__(str(path), thread_count=thread_count)
        self.checked = self._check()  # here, in the caller's frame: DCP would swallow it into an AssertionError

    def read_metadata(self) -> Metadata:
        metadata = dataclasses.replace(self.checked, storage_meta=StorageMeta())
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _check(self) -> Metadata:
        """The folder validated as every aockpt load validates it, described as DCP metadata."""
        with open_source(self.path) as source:
            ckpt = source.checkpoint
            if ckpt is None:
                raise UsageError(f"{self.path} is a torch pickle, which DCP cannot read in pieces; convert it once "
                                 f"with `aockpt pack {self.path} packed/` and load the packed folder")
            check_records(source, list(source.types))  # the same checks, and errors, as every other load
            folder = Path(ckpt.path) if Path(ckpt.path).is_dir() else Path(ckpt.path).parent
            sd_md, storage, keys = {}, {}, {}
            for name in source.types:
                entry = ckpt.entries[name]
                keys[name] = {inner: p.key for inner, p in entry.parts.items()}
                for part in entry.parts.values():
                    shard = ckpt.key_to_shard[part.key]
                    slot = ckpt.shards[shard].slots[part.key]
                    zeros = torch.Size([0] * len(slot.shape))
                    sd_md[part.key] = TensorStorageMetadata(TensorProperties(dtype=slot.dtype), torch.Size(slot.shape),
                                                            [ChunkStorageMetadata(zeros, torch.Size(slot.shape))])
                    storage[MetadataIndex(part.key, zeros)] = _HFStorageInfo(str(folder / shard),
                                                                             torch.Size(slot.shape), slot.dtype)
            aliases = dict(source.aliases)
        return Metadata(sd_md, planner_data={_RECORDS: keys, "aliases": aliases}, storage_data=storage)


class AockptLoadPlanner(DefaultLoadPlanner):
    """Fills each state-dict tensor (whole, or an aockpt.tp slice) in place from the stored parts; DCP reshards.

    `slices`: the ``Shards`` aockpt.tp returned for the template (or its ``.slices``); without it every
    template value must be whole."""

    def __init__(self, slices: Shards | dict[str, SliceInfo] | None = None) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.slices = dict(getattr(slices, "slices", slices) or {})

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Metadata | None = None,
                       is_coordinator: bool = False) -> None:
        keys, aliases = metadata.planner_data[_RECORDS], metadata.planner_data["aliases"]
        self.chunks: dict[str, tuple[str, _Chunk]] = {}  # destination id -> (stored key, chunk)
        missing = sorted(n for n in state_dict if aliases.get(n, n) not in keys)
        if missing:
            raise KeyMismatchError(f"the checkpoint has no tensor named {', '.join(missing[:10])}")
        seen: set[int] = set()
        for name, tensor in state_dict.items():
            if not isinstance(tensor, torch.Tensor):
                raise UsageError(f"{name}: the template holds a {type(tensor).__name__}, not a tensor to fill; build "
                                 "the model (quantized with the checkpoint's config) and pass its state_dict()")
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            _, chunks = _pieces(name, tensor, keys[aliases.get(name, name)], self.slices.get(name))
            for key, chunk in chunks.items():
                _check_target(name, key, chunk, metadata.state_dict_metadata[key])
                self.chunks[f"{name}\x00{key}"] = (key, chunk)
        super().set_up_planner({}, metadata, is_coordinator)

    def create_local_plan(self) -> LoadPlan:
        items = []
        for dest, (key, chunk) in self.chunks.items():
            local_md = ChunkStorageMetadata(torch.Size(chunk.offsets), chunk.local.size())
            for item in create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [local_md]):
                items.append(dataclasses.replace(item, dest_index=MetadataIndex(dest, item.dest_index.offset)))
        return LoadPlan(items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        local = self.chunks[read_item.dest_index.fqn][1].local
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            local = local.narrow(dim, start, length)
        return local

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        """The reader copied into a view of the target part already."""


def _check_target(name: str, key: str, chunk: _Chunk, stored: TensorStorageMetadata) -> None:
    """A target part must have the stored dtype and full size, or the copy would cast or misplace values."""
    if chunk.local.dtype != stored.properties.dtype or tuple(chunk.size) != tuple(stored.size):
        raise CorruptCheckpointError(
            f"{name}: part {key} is stored as {stored.properties.dtype} {list(stored.size)} but the state dict "
            f"holds {chunk.local.dtype} {list(chunk.size)}; quantize the model with the checkpoint's config first"
        )


__all__ = ["AockptSavePlanner", "AockptStorageWriter", "AockptStorageReader", "AockptLoadPlanner"]
