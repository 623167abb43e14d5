"""Reading stored parts straight onto devices at the disk's and the bus's speed.

Several threads ``preadv`` the shards, in file order, into reusable staging buffers (pinned for CUDA),
and each buffer is copied to its device on a side stream while the thread reads the next chunk into its
other buffer. Each (shard, device) pair gets one allocation; parts are views into it. Host memory stays
bounded by the staging buffers, and no page of a private mapping is touched. The same code runs with a
CPU "device" (plain buffers, synchronous copies), which is how tests check it without a GPU.
"""

from __future__ import annotations

import ctypes
import os
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from . import progress
from .errors import DeviceMemoryError
from .safetensors_io import SafetensorsFile, pread_into

ALIGN = 256  # bytes: every part starts where a fresh CUDA allocation would, so kernels see aligned pointers
CHUNK_BYTES = 16 << 20
THREADS = min(8, os.cpu_count() or 1)  # fresh processes, 32-core H200 host: 8 x 16 MB beat 16 (pinning costs)


@dataclass(frozen=True)
class Piece:
    """Bytes of one part inside one chunk: where they sit in the chunk and where they go in their block."""

    block: int
    src: int
    dst: int
    nbytes: int


@dataclass(frozen=True)
class Chunk:
    """One read: `nbytes` from `offset` of a shard's file, then a copy per piece."""

    shard: str
    offset: int
    nbytes: int
    pieces: tuple[Piece, ...]


@dataclass
class Block:
    """One allocation on one device, holding some of a shard's parts back to back (each ALIGN-aligned)."""

    device: torch.device
    shard: str
    nbytes: int = 0
    parts: dict[str, int] = field(default_factory=dict)  # key -> offset inside the block


@dataclass
class Plan:
    """Every allocation and every read needed to put the asked-for parts on their devices."""

    blocks: list[Block]
    chunks: list[Chunk]
    where: dict[str, int]  # key -> index of its block

    @property
    def nbytes(self) -> int:
        """Bytes read from files."""
        return sum(c.nbytes for c in self.chunks)


def back_to_back(sizes: Iterable[tuple[str, int]]) -> tuple[dict[str, int], int]:
    """Offsets of parts laid one after another in one buffer, each ALIGN-aligned, and the buffer's size."""
    offsets, end = {}, 0
    for key, nbytes in sizes:
        offsets[key] = -(-end // ALIGN) * ALIGN
        end = offsets[key] + nbytes
    return offsets, end


def plan_reads(shards: dict[str, SafetensorsFile], placement: dict[str, tuple[str, torch.device]],
               chunk_bytes: int = CHUNK_BYTES) -> Plan:
    """Blocks and chunked reads for `placement` (key -> (shard, device)); contiguous parts are read together."""
    blocks: list[Block] = []
    where: dict[str, int] = {}
    chunks: list[Chunk] = []
    for shard_name, shard in shards.items():
        keys = sorted((k for k, (s, _) in placement.items() if s == shard_name and _size(shard, k)),
                      key=lambda k: shard.slots[k].begin)
        for device in dict.fromkeys(placement[k][1] for k in keys):
            block = Block(device, shard_name)
            block.parts, block.nbytes = back_to_back((k, _size(shard, k)) for k in keys if placement[k][1] == device)
            where.update(dict.fromkeys(block.parts, len(blocks)))
            blocks.append(block)
        chunks.extend(_chunks(shard_name, shard, keys, blocks, where, chunk_bytes))
    return Plan(blocks, chunks, where)


def _size(shard: SafetensorsFile, key: str) -> int:
    """Stored bytes of one key."""
    slot = shard.slots[key]
    return slot.end - slot.begin


def _runs(shard: SafetensorsFile, keys: list[str]) -> Iterator[list[str]]:
    """Keys (in file order) grouped into runs that lie back to back in the file."""
    run: list[str] = []
    for key in keys:
        if run and shard.slots[run[-1]].end != shard.slots[key].begin:
            yield run
            run = []
        run.append(key)
    if run:
        yield run


def _chunks(shard_name: str, shard: SafetensorsFile, keys: list[str], blocks: list[Block],
            where: dict[str, int], chunk_bytes: int) -> Iterator[Chunk]:
    """Each run of back-to-back parts cut into reads of at most `chunk_bytes`, a part split where needed.

    One pass over the run's keys (not one per chunk): a checkpoint has thousands of chunks and parts."""
    for run in _runs(shard, keys):
        slots = [shard.slots[key] for key in run]
        first = 0  # the first part not wholly before the current chunk
        for offset in range(slots[0].begin, slots[-1].end, chunk_bytes):
            stop = min(offset + chunk_bytes, slots[-1].end)
            while slots[first].end <= offset:
                first += 1
            pieces = []
            for key, slot in zip(run[first:], slots[first:]):
                if slot.begin >= stop:
                    break
                lo, hi = max(slot.begin, offset), min(slot.end, stop)
                pieces.append(Piece(where[key], lo - offset, blocks[where[key]].parts[key] + lo - slot.begin, hi - lo))
            yield Chunk(shard_name, shard.data_start + offset, stop - offset, tuple(pieces))


@dataclass
class Loading:
    """Parts being read by worker threads: the views exist at once, their bytes are valid once `wait` returns.

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
        except BaseException:  # Ctrl-C while waiting: the workers stop after their current 16 MB
            self.cancel()
            raise
        if self.errors:
            raise self.errors[0]

    def cancel(self) -> None:
        """Stop handing out reads and wait for the workers, ignoring their errors (the caller is raising its own)."""
        self.stop.set()
        for w in self.workers:
            w.join()


def load_parts(shards: dict[str, SafetensorsFile], placement: dict[str, tuple[str, torch.device]], *,
               threads: int = THREADS, chunk_bytes: int = CHUNK_BYTES) -> dict[str, torch.Tensor]:
    """The stored tensors under `placement`'s keys, each on its device, as views of one block per shard and device."""
    loading = start_loading(shards, placement, threads=threads, chunk_bytes=chunk_bytes)
    loading.wait()
    return loading.parts


def start_loading(shards: dict[str, SafetensorsFile], placement: dict[str, tuple[str, torch.device]], *,
                  threads: int = THREADS, chunk_bytes: int = CHUNK_BYTES) -> Loading:
    """`load_parts` that returns as soon as the reads have started, so the caller can build while they run."""
    plan = plan_reads(shards, placement, chunk_bytes)
    blocks = [_allocate(b) for b in plan.blocks]
    out = {}
    for key, (shard_name, device) in placement.items():
        slot = shards[shard_name].slots[key]
        if key not in plan.where:
            out[key] = torch.empty(slot.shape, dtype=slot.dtype, device=device)
            continue
        block = plan.blocks[plan.where[key]]
        raw = blocks[plan.where[key]][block.parts[key]:block.parts[key] + slot.end - slot.begin]
        out[key] = raw.view(slot.dtype).reshape(slot.shape)
    loading = Loading(out, plan.nbytes)
    if plan.chunks:
        _start(shards, plan, blocks, min(threads, len(plan.chunks)), chunk_bytes, loading)
    return loading


def _allocate(block: Block) -> torch.Tensor:
    """The block's one allocation; a device that cannot hold it is one clear error, before anything is read."""
    try:
        return torch.empty(block.nbytes, dtype=torch.uint8, device=block.device)
    except torch.OutOfMemoryError as e:
        raise DeviceMemoryError(
            f"{block.device} has no room for the {len(block.parts)} tensors of {block.shard} "
            f"({block.nbytes / 2**30:.2f} GiB in one allocation): {str(e).splitlines()[0][:160]}; free memory on "
            "it, load fewer names with keys=, or spread the model with load_pretrained(device_map=\"auto\")"
        ) from e


def _start(shards: dict[str, SafetensorsFile], plan: Plan, blocks: list[torch.Tensor], threads: int,
           chunk_bytes: int, loading: Loading) -> None:
    """Start `threads` workers reading and copying every chunk, each alternating between two staging buffers."""
    pinned = any(b.device.type == "cuda" for b in plan.blocks)
    chunks = iter(plan.chunks)
    lock = threading.Lock()
    fds = {name: shard.fileno() for name, shard in shards.items()}

    def next_chunk() -> Chunk | None:
        with lock:
            return None if loading.errors or loading.stop.is_set() else next(chunks, None)

    def work() -> None:
        try:  # each thread pins its own buffers, so the first reads start before the last buffer is pinned
            staging = torch.empty(2 * chunk_bytes, dtype=torch.uint8, pin_memory=pinned)
            buffers = [staging[:chunk_bytes], staging[chunk_bytes:]]
            copier = _Copier(blocks)
            turn = 0
            while (chunk := next_chunk()) is not None:
                buf = buffers[turn]
                copier.wait(turn)
                view = memoryview((ctypes.c_char * chunk.nbytes).from_address(buf.data_ptr())).cast("B")
                pread_into(fds[chunk.shard], view, chunk.offset, shards[chunk.shard].path)
                with lock:
                    loading.read += chunk.nbytes
                copier.copy(turn, buf, chunk.pieces)
                turn ^= 1
            copier.finish()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread by Loading.wait
            with lock:
                loading.errors.append(e)

    loading.workers.extend(threading.Thread(target=work, name=f"aockpt-load-{i}") for i in range(threads))
    for w in loading.workers:
        w.start()


class _Copier:
    """One worker's copies: asynchronous on its own stream per CUDA device, with an event per staging buffer."""

    def __init__(self, blocks: list[torch.Tensor]):
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
