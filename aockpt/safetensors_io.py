"""The safetensors file layout, written by streaming and read through a bounded, validating parser.

Writing: the header is computed from shapes and dtypes alone, then each tensor's bytes are streamed
to the file, so peak memory is one tensor, never the whole shard. Reading: every header rule of the
safetensors spec is checked before any tensor is touched, then tensors are views into a private
memory map (zero copy on CPU).
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from .atomic import output_error
from .errors import CorruptCheckpointError, UnsupportedTensorError
from .fetch import ByteFile, LocalFile, read_header
from .registry import STORAGE_CODES, STORAGE_DTYPES
from .typed_json import dumps, loads_strict

_ALIGN = 8
_CHUNK = 16 * 1024 * 1024
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives inside a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def storage_code(tensor: torch.Tensor, key: str) -> str:
    """The safetensors dtype code of a tensor, refusing dtypes the format cannot hold."""
    code = STORAGE_CODES.get(tensor.dtype)
    if code is None:
        raise UnsupportedTensorError(f"{key} has dtype {tensor.dtype}, which safetensors cannot store")
    return code


def build_header(items: list[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> bytes:
    """Header bytes (length prefix + padded JSON) for tensors laid out in the given order."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": storage_code(tensor, key), "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = dumps(header).encode("utf-8")
    text += b" " * (-(len(text) + 8) % _ALIGN)
    return struct.pack("<Q", len(text)) + text


def aligned_order(items: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Largest element size first, so every tensor starts at an offset aligned to its element size."""
    return sorted(items, key=lambda kv: -kv[1].element_size())


def _write_tensor(f: BinaryIO, tensor: torch.Tensor, hasher: ThreadPoolExecutor) -> str:
    """Stream one tensor's bytes and return their sha256, hashing each chunk while it is being written.

    Copies only non-contiguous or device data. hashlib and file writes both release the GIL, so on two
    cores the digest costs no wall time beyond the write.
    """
    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    digest = hashlib.sha256()
    for start in range(0, flat.numel(), _CHUNK):
        chunk = memoryview(flat[start:start + _CHUNK].numpy())
        hashed = hasher.submit(digest.update, chunk)
        f.write(chunk)
        hashed.result()
    return digest.hexdigest()


def write_file(
    path: Path,
    items: list[tuple[str, torch.Tensor]],
    make_metadata: Callable[[dict[str, str]], dict[str, str]],
    written: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, str]:
    """Write a safetensors file in one pass over the data and fsync it; returns each key's sha256.

    The metadata may embed the digests: the header is first written with placeholder digests of the
    final length, then rewritten in place once the data has been hashed on its way to disk.
    `written(tensor)` is called once each tensor's bytes are in the file (e.g. to release its pages).
    """
    digests = {key: "0" * 64 for key, _ in items}
    header = build_header(items, make_metadata(digests))
    try:
        with open(path, "wb") as f, ThreadPoolExecutor(1, thread_name_prefix="aockpt-sha256") as hasher:
            f.write(header)
            for key, tensor in items:
                digests[key] = _write_tensor(f, tensor, hasher)
                if written is not None:
                    written(tensor)
            final = build_header(items, make_metadata(digests))
            if len(final) != len(header):
                raise RuntimeError("header length changed when digests were filled in")
            f.seek(0)
            f.write(final)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise output_error(path, e) from e
    return digests


def sha256_hex(data: memoryview) -> str:
    """The digest verify compares with the one recorded at pack time."""
    return hashlib.sha256(data).hexdigest()


class SafetensorsFile:
    """A validated safetensors file over any byte source (fetch.ByteFile); CPU tensors are zero-copy views
    where the source maps the file, reads otherwise."""

    def __init__(self, source: Path | ByteFile):
        self.file: ByteFile = LocalFile(Path(source)) if isinstance(source, (str, os.PathLike)) else source
        self.path = Path(source) if isinstance(source, (str, os.PathLike)) else Path(self.file.where)
        try:
            text, self._data_start = read_header(self.file)
            self.slots, self.metadata = _parse_header(text, self.file.size - self._data_start, self.path)
            self._map = self.file.mapped()
            self.bytes_read = 0  # bytes read_slice has read, for proving what a tensor-parallel rank reads
        except BaseException:
            self.file.close()
            raise

    @property
    def data_start(self) -> int:
        """File offset where the tensor data area (which slot offsets count from) begins."""
        return self._data_start

    def keys(self) -> list[str]:
        """Tensor keys in file order."""
        return list(self.slots)

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor stored under `key` as a view of the mapped file (a copy if misaligned or not mapped)."""
        slot = self.slots[key]
        count = slot.end - slot.begin
        if count == 0:
            return torch.empty(slot.shape, dtype=slot.dtype)
        if self._map is None:
            return self.read_slice(key)
        offset = self._data_start + slot.begin
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=count, offset=offset)
        if offset % torch.empty((), dtype=slot.dtype).element_size():
            raw = raw.clone()
        return raw.view(slot.dtype).reshape(slot.shape)

    def read_slice(self, key: str, dim: int = 0, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Indices start:stop of `key` along `dim` read from the file (only those bytes) into a new tensor."""
        slot = self.slots[key]
        shape = list(slot.shape) or [1]
        stop = shape[dim] if stop is None else stop
        inner = math.prod(shape[dim + 1:]) * slot.dtype.itemsize
        run, stride, runs = (stop - start) * inner, shape[dim] * inner, math.prod(shape[:dim])
        buf = torch.empty(runs * run, dtype=torch.uint8)
        view = memoryview(buf.numpy()) if buf.numel() else memoryview(b"")
        first = self._data_start + slot.begin + start * inner
        if run == stride:
            runs, run = 1, runs * run
        self.file.read_into([(first + i * stride, view[i * run:(i + 1) * run]) for i in range(runs)])
        self.bytes_read += buf.numel()
        shape[dim] = stop - start
        return buf.view(slot.dtype).reshape(shape if slot.shape else ())

    def raw_bytes(self, key: str) -> memoryview:
        """The stored bytes of one tensor, for digests, without building a tensor."""
        slot = self.slots[key]
        start = self._data_start + slot.begin
        if self._map is None:
            return memoryview(self.read_slice(key).reshape(-1).view(torch.uint8).numpy()) if slot.end > slot.begin \
                else memoryview(b"")
        return self._map[start:start + slot.end - slot.begin]

    def close(self) -> None:
        """Release the file; tensors already returned keep the mapping alive."""
        self.file.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_header(raw: bytes, data_size: int, path: Path) -> tuple[dict[str, TensorSlot], dict[str, str]]:
    """Check the header's JSON: strict, and every offset and size rule against the data area's size."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(f"{path}: header is not UTF-8 ({e}); the file is damaged or not safetensors") from e
    header = loads_strict(text, f"{path} header")
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptCheckpointError(f"{path}: __metadata__ must map strings to strings")
    slots = {key: _slot(key, entry, path) for key, entry in header.items()}
    _check_offsets(slots, data_size, path)
    return slots, metadata


def _slot(key: str, entry: object, path: Path) -> TensorSlot:
    """One header entry, checked: known dtype, non-negative shape, offsets matching dtype x shape."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CorruptCheckpointError(f"{path}: header entry {key!r} must have exactly dtype, shape, data_offsets")
    dtype = STORAGE_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    shape, offsets = entry["shape"], entry["data_offsets"]
    if dtype is None:
        raise CorruptCheckpointError(f"{path}: tensor {key!r} has unknown dtype {entry['dtype']!r}")
    if not _ints(shape) or not (_ints(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise CorruptCheckpointError(f"{path}: tensor {key!r} has a malformed shape or data_offsets")
    if not _spans(shape, dtype.itemsize, offsets[1] - offsets[0]):
        raise CorruptCheckpointError(
            f"{path}: tensor {key!r} declares {entry['dtype']} {shape} but spans {offsets[1] - offsets[0]} bytes"
        )
    return TensorSlot(dtype, tuple(shape), offsets[0], offsets[1])


def _spans(shape: list[int], itemsize: int, span: int) -> bool:
    """Whether dtype x shape is exactly `span` bytes, stopping as soon as the product passes it.

    Shapes come from the file, so a product of many huge dimensions must never be built in full; an
    empty tensor's other dimensions must still fit the int64 sizes torch computes with.
    """
    empty = 0 in shape
    limit = _INT64_MAX if empty else span
    size = itemsize
    for dim in shape:
        size *= dim or 1
        if size > limit:
            return False
    return span == 0 if empty else size == span


def _ints(value: object) -> bool:
    """A list of non-negative plain ints (bools excluded)."""
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _check_offsets(slots: dict[str, TensorSlot], data_size: int, path: Path) -> None:
    """Tensors must tile the data area exactly: start at 0, no gaps, no overlaps, end at the file's end."""
    position = 0
    for slot in sorted(slots.values(), key=lambda s: (s.begin, s.end)):
        if slot.begin != position:
            raise CorruptCheckpointError(f"{path}: tensor data overlaps or leaves a gap at byte {position}")
        position = slot.end
    if position != data_size:
        raise CorruptCheckpointError(
            f"{path}: tensors end at byte {position} of a {data_size}-byte data area (truncated or padded file)"
        )
