"""Fetch stage of the load pipeline (plan -> fetch -> place -> build): byte ranges of files into buffers.

The interface a byte source implements (stable; a second source needs nothing else, and plan, place and
build never see which source they read):

``ByteFile`` (a ``typing.Protocol``), one per file:

- ``where: str`` -- how errors name the file (a path, a URL).
- ``size: int`` -- bytes in the file.
- ``version: str`` -- a token that changes whenever the file's bytes may have changed (locally device,
  inode, size and modification time; remotely an ETag or a commit), for caches and for telling a
  replaced file from the one that was planned.
- ``read_into(reads)`` -- fill each ``(offset, buffer)`` of ``reads`` (a sequence; buffers are writable
  memoryviews over host memory, pinned or not) with the file's bytes from that offset; bytes the file does
  not have are a ``CorruptCheckpointError`` naming ``where``. Called from several threads at once.
- ``mapped()`` -- the whole file as zero-copy host memory (a private, never-written mapping), or None
  where there is none (a remote source): the CPU then gets its parts through ``read_into`` too.
- ``close()`` -- release the file; memory already handed out stays valid.

``read_header(file)`` reads a safetensors header through that interface (length prefix and JSON, bounded
before anything is allocated), so a header never needs more than ``read_into``.

The engine, ``fetch(files, chunks, blocks)``: worker threads take one ``Chunk`` (byte ranges of one file,
at most one staging buffer's worth) at a time, ``read_into`` one of two staging buffers (pinned when a block is on CUDA), and copy its
``Piece`` s into their ``blocks`` (one allocation per file and device, made by the place stage) on a side
stream while reading the next chunk into the other buffer. Host memory stays bounded by the staging
buffers. A strided slice's rows are one ``Read`` (rows, stride): a file with a mapping (local) reads the
whole extent at once and the rows are packed in memory; one without (remote) gets each row as its own read. ``LocalFile`` is today's source: ``preadv`` for reads, a private mapping for CPU views.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import sys
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import BinaryIO, Callable, Mapping, NamedTuple, Protocol, Sequence

import torch

from . import progress
from .errors import CorruptCheckpointError

CHUNK_BYTES = 16 << 20
THREADS = min(8, os.cpu_count() or 1)  # fresh processes, 32-core H200 host: 8 x 16 MB beat 16 (pinning costs)
MAX_HEADER_BYTES = 100_000_000  # the reference's MAX_HEADER_SIZE


class ByteFile(Protocol):
    """The bytes of one file, wherever they live (see the module docstring for each member's contract)."""

    where: str
    size: int
    version: str

    def read_into(self, reads: Sequence[tuple[int, memoryview]]) -> None:
        """Fill each buffer with the file's bytes from its offset."""

    def mapped(self) -> memoryview | None:
        """The whole file as zero-copy host memory, or None."""

    def close(self) -> None:
        """Release the file."""


class LocalFile:
    """A regular file on this machine: positioned reads (``preadv``) and a private read-only mapping."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.where = str(self.path)
        self._file = _open_regular(self.path)
        try:
            stat = os.fstat(self._file.fileno())
            self.size = stat.st_size
            self.version = f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY) if self.size else None
        except BaseException:
            self._file.close()
            raise

    def read_into(self, reads: Sequence[tuple[int, memoryview]]) -> None:
        """Fill each buffer from the file at its offset, however many reads the OS splits it into."""
        fd = self._file.fileno()
        for offset, view in reads:
            while len(view):
                got = os.preadv(fd, [view], offset)
                if got <= 0:
                    raise CorruptCheckpointError(f"{self.where} ended while reading it; the file was truncated "
                                                 "after opening")
                view, offset = view[got:], offset + got

    def mapped(self) -> memoryview | None:
        """The private mapping (copy-on-write, so torch may wrap it; never written)."""
        return memoryview(self._map) if self._map is not None else None

    def close(self) -> None:
        """Close the descriptor; the mapping lives as long as views of it do."""
        self._file.close()


class CountedFile:
    """A local file through the fetch interface that counts the bytes asked of it: how tests and benchmarks
    prove what a load (a tensor-parallel rank's, say) reads. `unmapped` sends every byte through read_into."""

    def __init__(self, path: Path, *, unmapped: bool = False):
        self.file = LocalFile(path)
        self.where, self.size, self.version = self.file.where, self.file.size, self.file.version
        self.unmapped, self.read = unmapped, 0

    def read_into(self, reads: Sequence[tuple[int, memoryview]]) -> None:
        """Count, then read through the local file."""
        self.read += sum(len(view) for _, view in reads)
        self.file.read_into(reads)

    def mapped(self) -> memoryview | None:
        """The local file's mapping, or None when every byte must be read (and counted)."""
        return None if self.unmapped else self.file.mapped()

    def close(self) -> None:
        """Release the local file."""
        self.file.close()


def _open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading, with one clear error for anything else."""
    try:
        if not path.is_file():
            raise CorruptCheckpointError(f"{path} is not a regular file")
        return open(path, "rb")
    except OSError as e:
        raise CorruptCheckpointError(f"cannot read {path}: {e.strerror}") from e


def read_header(file: ByteFile) -> tuple[bytes, int]:
    """A safetensors header's JSON bytes and where the data area starts, its length checked before reading it."""
    if file.size < 8:
        raise CorruptCheckpointError(f"{file.where} is {file.size} bytes, too short for a safetensors file "
                                     "(truncated?)")
    prefix = bytearray(8)
    file.read_into([(0, memoryview(prefix))])
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES or length > file.size - 8:
        raise CorruptCheckpointError(
            f"{file.where}: header claims {length} bytes but the file has {file.size - 8} after the length (limit "
            f"{MAX_HEADER_BYTES}); the file is truncated or not safetensors"
        )
    text = bytearray(length)
    file.read_into([(8, memoryview(text))])
    return bytes(text), 8 + length


@dataclass(frozen=True)
class Piece:
    """Bytes of one part inside one chunk: where they sit in the chunk and where they go in their block."""

    block: int
    src: int
    dst: int
    nbytes: int


class Read(NamedTuple):
    """`rows` runs of `nbytes` bytes, `stride` apart in a file from `offset` (one run: contiguous bytes)."""

    offset: int
    nbytes: int
    rows: int = 1
    stride: int = 0


@dataclass(frozen=True)
class Chunk:
    """One batch of reads from file `file`, filling a staging buffer back to back (a strided slice's rows
    packed), then a copy per piece."""

    file: str
    reads: tuple[Read, ...]
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        """Bytes the chunk keeps."""
        return sum(r.nbytes * r.rows for r in self.reads)


@dataclass
class Loading:
    """Parts being fetched by worker threads: the views exist at once, their bytes are valid once `wait` returns.

    Building tensor wrappers around the views overlaps the reads; nothing may read the bytes before `wait`."""

    parts: dict[str, torch.Tensor]
    nbytes: int
    workers: list[threading.Thread] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    read: int = 0  # bytes read so far, for the progress bar

    def wait(self) -> None:
        """Block until every read and copy is done (a bar of bytes read on a terminal); raise the first error."""
        try:
            with progress.bar("reading", self.nbytes) as show:
                for w in self.workers:
                    while w.is_alive():
                        w.join(0.2)
                        show(self.read)
        except BaseException:  # Ctrl-C while waiting: the workers stop after their current chunk
            self.cancel()
            raise
        if self.errors:
            raise self.errors[0]

    def cancel(self) -> None:
        """Stop handing out reads and wait for the workers, ignoring their errors (the caller is raising its own)."""
        self.stop.set()
        for w in self.workers:
            w.join()


def fetch(files: Mapping[str, ByteFile], chunks: Sequence[Chunk], blocks: Sequence[torch.Tensor],
          loading: Loading, *, threads: int = THREADS, chunk_bytes: int = CHUNK_BYTES) -> Loading:
    """Start worker threads reading every chunk and copying its pieces into `blocks`; `loading.wait()` joins them."""
    if not chunks:
        return loading
    pinned = any(b.device.type == "cuda" for b in blocks)
    staging_bytes = min(chunk_bytes, max(c.nbytes for c in chunks))
    extent_bytes = max(((r.rows - 1) * r.stride + r.nbytes for c in chunks for r in c.reads), default=0)
    todo = iter(chunks)
    lock = threading.Lock()
    local = {name: f.mapped() is not None for name, f in files.items()}  # gaps cost less than a read per row

    def next_chunk() -> Chunk | None:
        with lock:
            return None if loading.errors or loading.stop.is_set() else next(todo, None)

    def work() -> None:
        try:  # each thread pins its own buffers, so the first reads start before the last buffer is pinned
            staging = torch.empty(2 * staging_bytes, dtype=torch.uint8, pin_memory=pinned)
            buffers = [staging[:staging_bytes], staging[staging_bytes:]]
            extents = None  # a local file's strided extents land here first, made on first use
            copier = _Copier(blocks)
            turn = 0
            while (chunk := next_chunk()) is not None:
                buf = buffers[turn]
                copier.wait(turn)
                file = files[chunk.file]
                at, reads = 0, []
                for r in chunk.reads:
                    if r.rows > 1 and local[chunk.file]:  # one read of the whole extent, then the rows packed
                        if extents is None:
                            extents = torch.empty(extent_bytes, dtype=torch.uint8)
                        file.read_into([(r.offset, _bytes_of(extents, (r.rows - 1) * r.stride + r.nbytes))])
                        buf[at:at + r.rows * r.nbytes].view(r.rows, r.nbytes).copy_(
                            extents.as_strided((r.rows, r.nbytes), (r.stride, 1)))
                    else:  # exact bytes: a run, or each row (a remote source reads them concurrently)
                        view = _bytes_of(buf[at:], r.rows * r.nbytes)
                        reads.extend((r.offset + i * r.stride, view[i * r.nbytes:(i + 1) * r.nbytes])
                                     for i in range(r.rows))
                    at += r.rows * r.nbytes
                file.read_into(reads)
                with lock:
                    loading.read += chunk.nbytes
                copier.copy(turn, buf, chunk.pieces)
                turn ^= 1
            copier.finish()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread by Loading.wait
            with lock:
                loading.errors.append(e)

    count = min(threads, len(chunks))
    loading.workers.extend(threading.Thread(target=work, name=f"aockpt-fetch-{i}") for i in range(count))
    for w in loading.workers:
        w.start()
    return loading


def _bytes_of(tensor: torch.Tensor, nbytes: int) -> memoryview:
    """The first `nbytes` of a host uint8 tensor as a writable memoryview (what ``read_into`` fills)."""
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


class _Copier:
    """One worker's copies: asynchronous on its own stream per CUDA device, with an event per staging buffer."""

    def __init__(self, blocks: Sequence[torch.Tensor]):
        self.blocks = blocks
        self.streams = {b.device: torch.cuda.Stream(b.device) for b in blocks if b.device.type == "cuda"}
        self.events: list[list[torch.cuda.Event]] = [[], []]

    def wait(self, turn: int) -> None:
        """Block until the copies out of staging buffer `turn` are done, so it can be refilled."""
        for event in self.events[turn]:
            event.synchronize()
        self.events[turn] = []

    def copy(self, turn: int, buf: torch.Tensor, pieces: tuple[Piece, ...]) -> None:
        """Queue a copy of every piece from `buf` into its block."""
        used = set()
        for p in pieces:
            dst = self.blocks[p.block]
            stream = self.streams.get(dst.device)
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                dst[p.dst:p.dst + p.nbytes].copy_(buf[p.src:p.src + p.nbytes], non_blocking=stream is not None)
            if stream is not None:
                used.add(dst.device)
        for device in used:
            event = torch.cuda.Event()
            event.record(self.streams[device])
            self.events[turn].append(event)

    def finish(self) -> None:
        """Wait for every queued copy."""
        self.wait(0)
        self.wait(1)


# ---- pages of mapped files: a CPU load reads through a private mapping, which writers release as they go ----

def page_releaser() -> Callable[[torch.Tensor], None]:
    """release_mapped for one tensor at a time, reading /proc/self/maps once (so per-tensor work stays constant)."""
    mapped: list[tuple[int, int]] = []

    def release(tensor: torch.Tensor) -> None:
        if tensor.numel() and not mapped:
            mapped.extend(_file_mappings())
        release_mapped([tensor], mapped)

    return release


def release_mapped(tensors: list[torch.Tensor], mapped: list[tuple[int, int]] | None = None) -> None:
    """Drop the pages of file-mapped, unmodified tensors from this process; the page cache keeps them.

    A later read faults them back in from the file, so this never loses data for tensors backed by a
    private file mapping that was only read. Anonymous memory is never touched (MADV_DONTNEED would zero
    it), so each range is checked against /proc/self/maps first. Linux only; elsewhere a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    mapped = _file_mappings() if mapped is None else mapped
    page = mmap.PAGESIZE
    for tensor in tensors:
        start, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        if size == 0 or tensor.device.type != "cpu":
            continue
        lo, hi = start - start % page, -(-(start + size) // page) * page
        if any(a <= lo and hi <= b for a, b in mapped):
            _libc().madvise(lo, hi - lo, mmap.MADV_DONTNEED)


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's private file mappings (inode != 0), where pack's source views live."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[4] != "0" and fields[1].startswith("r") and fields[1][3] == "p":
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@cache
def _libc() -> ctypes.CDLL:
    """The C library's madvise, with its argument types declared."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc
