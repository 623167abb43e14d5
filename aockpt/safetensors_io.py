"""The safetensors file layout, written by streaming and read through a bounded, validating parser.

Writing: the header is computed from shapes and dtypes alone, then each tensor's bytes are streamed
to the file, so peak memory is one tensor, never the whole shard. Reading: every header rule of the
reference reader (the ``safetensors`` package: its Rust ``Metadata::validate`` and its torch loader) is
checked before any tensor is touched, then tensors are views into a private memory map (zero copy on CPU).
aockpt is stricter in three places only: duplicate JSON keys, entry fields other than dtype/shape/
data_offsets, and nesting or item budgets are refused (the reference takes the last duplicate and ignores
extra fields). tests/test_safetensors_io.py holds the differential table.
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
_U64 = 2**64  # the reference reads shapes and offsets as usize and multiplies them with overflow checks
# dtypes whose elements are smaller than a byte: the header counts values, torch's dtype packs them
# (Dtype::bitsize; the torch loader halves F4's last dimension, which must be even)
_SUB_BYTE_BITS = {"F4": 4}


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


def header_shape(tensor: torch.Tensor, code: str, key: str) -> list[int]:
    """The shape the header records: torch's, except that sub-byte dtypes count values (F4: two a byte)."""
    shape = list(tensor.shape)
    if code in _SUB_BYTE_BITS:
        if not shape:
            raise UnsupportedTensorError(f"{key} is a 0-dim {tensor.dtype} tensor (two 4-bit values), which "
                                         "safetensors cannot record; give it a dimension")
        shape[-1] *= 8 // _SUB_BYTE_BITS[code]
    return shape


def build_header(items: list[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> bytes:
    """Header bytes (length prefix + padded JSON) for tensors laid out in the given order."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        code = storage_code(tensor, key)
        header[key] = {"dtype": code, "shape": header_shape(tensor, code, key),
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
            return _empty(slot.dtype, slot.shape)
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
    header = loads_strict(text, f"{path} header", _header_int)
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # the reference reads `null` as no metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptCheckpointError(f"{path}: __metadata__ must map strings to strings")
    slots = {key: _slot(key, entry, path) for key, entry in header.items()}
    _check_offsets(slots, data_size, path)
    return slots, metadata


def _header_int(text: str) -> int | float:
    """An integer literal of the header; `-0` stays a float, as the reference's JSON parser reads it (refused)."""
    return -0.0 if text == "-0" else int(text)


def _slot(key: str, entry: object, path: Path) -> TensorSlot:
    """One header entry, checked as the reference checks it: known dtype, shape and offsets it can hold,
    dtype x shape equal to the byte span; the slot keeps torch's shape (F4's last dimension halved)."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CorruptCheckpointError(f"{path}: header entry {key!r} must have exactly dtype, shape, data_offsets")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    dtype = STORAGE_DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise CorruptCheckpointError(f"{path}: tensor {key!r} has unknown dtype {code!r}")
    if not _ints(shape) or not (_ints(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise CorruptCheckpointError(f"{path}: tensor {key!r} has a malformed shape or data_offsets")
    span = offsets[1] - offsets[0]
    if _nbytes(shape, _SUB_BYTE_BITS.get(code, dtype.itemsize * 8)) != span:
        hint = (" (safetensors counts F4 in 4-bit values, two a byte; aockpt format 1.0.0 recorded torch's packed "
                "shape: re-pack such a file from its source)") if code in _SUB_BYTE_BITS else ""
        raise CorruptCheckpointError(f"{path}: tensor {key!r} declares {code} {str(shape)[:80]} but spans {span} "
                                     f"bytes{hint}")
    torch_shape = _torch_shape(code, shape, key, path)
    if span == 0 and _large(torch_shape):
        try:  # torch's own stride and size checks, for the empty shapes large enough to overflow them
            _empty(dtype, torch_shape)
        except (RuntimeError, TypeError, ValueError, OverflowError) as e:
            raise CorruptCheckpointError(f"{path}: tensor {key!r} has shape {str(shape)[:80]}, which torch cannot "
                                         f"make ({str(e)[:80]})") from e
    return TensorSlot(dtype, torch_shape, offsets[0], offsets[1])


def _nbytes(shape: list[int], bits: int) -> int | None:
    """Bytes of `shape` elements of `bits` bits as the reference computes them, or None where it refuses:
    every dimension and running product must fit a u64 (checked as it goes, so a product of many huge
    dimensions is never built), and the bits must end on a byte boundary."""
    count = 1
    for dim in shape:
        count *= dim
        if dim >= _U64 or count >= _U64:
            return None
    total = count * bits
    return None if total >= _U64 or total % 8 else total // 8


def _large(shape: tuple[int, ...]) -> bool:
    """Whether an empty shape's nonzero dimensions multiply to 2**31 or more (stopping there), so torch's
    stride arithmetic could overflow; smaller ones need no torch call (a header may hold millions)."""
    size = 1
    for dim in shape:
        size *= dim or 1
        if size >= 2**31:
            return True
    return False


def _torch_shape(code: str, shape: list[int], key: str, path: Path) -> tuple[int, ...]:
    """The shape torch's dtype gives the tensor: the header's, with sub-byte values packed into bytes."""
    if code not in _SUB_BYTE_BITS:
        return tuple(shape)
    per_byte = 8 // _SUB_BYTE_BITS[code]
    if not shape or shape[-1] % per_byte:
        raise CorruptCheckpointError(f"{path}: tensor {key!r} is {code} {shape}; torch packs {per_byte} values a "
                                     "byte along the last dimension, which must be a multiple of that")
    return (*shape[:-1], shape[-1] // per_byte)


def _empty(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """An empty tensor of `shape`, made as the reference's torch loader makes it (a view of no bytes,
    reshaped), so the same shapes are accepted; torch.empty refuses some it takes."""
    return torch.empty(0, dtype=torch.uint8).view(dtype).reshape(shape)


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
