"""Place stage of the load pipeline: each asked-for part gets a home on its device, and the reads that fill it.

Each (shard, accelerator) pair gets one allocation (a ``Block``; on the CPU each part its own, which keeps
tensors ``torch.save``-able); parts are ALIGN-aligned views into it. The reads are chunks of file byte
ranges (a strided slice's rows as one strided read), each split into the pieces that go to their blocks; the fetch
stage (aockpt.fetch) runs them through whatever byte source holds the file. The same code runs with a CPU
"device" (plain buffers, synchronous copies), which is how tests check it without a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from .errors import DeviceMemoryError
from .fetch import CHUNK_BYTES, THREADS, Chunk, Loading, Piece, Read, fetch
from .safetensors_io import SafetensorsFile, TensorSlot

ALIGN = 256  # bytes: every part starts where a fresh CUDA allocation would, so kernels see aligned pointers


@dataclass(frozen=True)
class Want:
    """One part to place: stored `key` of `shard`, on `device`, whole or only `span` (dim, start, stop) of it."""

    shard: str
    key: str
    device: torch.device
    span: tuple[int, int, int] | None = None

    def shape(self, slot: TensorSlot) -> tuple[int, ...]:
        """The placed part's shape."""
        if self.span is None:
            return slot.shape
        dim, start, stop = self.span
        return (*slot.shape[:dim], stop - start, *slot.shape[dim + 1:])

    def segments(self, slot: TensorSlot) -> tuple[int, int, int, int]:
        """What it reads: (begin, nbytes, rows, stride): `rows` runs of `nbytes` bytes, `stride` apart in the
        file from `begin`, landing back to back in the placed part (one row when the bytes are contiguous)."""
        if self.span is None:
            return slot.begin, slot.end - slot.begin, 1, 0
        dim, start, stop = self.span
        inner = math.prod(slot.shape[dim + 1:]) * slot.dtype.itemsize
        run, stride = (stop - start) * inner, slot.shape[dim] * inner
        rows = math.prod(slot.shape[:dim])
        if run == stride or rows == 1:
            return slot.begin + start * inner, rows * run, 1, 0
        return slot.begin + start * inner, run, rows, stride


@dataclass
class Block:
    """One allocation on one device, holding some of a shard's parts back to back (each ALIGN-aligned)."""

    device: torch.device
    shard: str
    nbytes: int = 0
    parts: dict[str, int] = field(default_factory=dict)  # placed part -> offset inside the block


@dataclass
class Plan:
    """Every allocation and every read needed to put the asked-for parts on their devices."""

    blocks: list[Block]
    chunks: list[Chunk]
    where: dict[str, int]  # placed part -> index of its block

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


def plan_reads(shards: dict[str, SafetensorsFile], wants: dict[str, Want], chunk_bytes: int = CHUNK_BYTES) -> Plan:
    """Blocks and chunked reads for `wants` (placed part -> Want); bytes back to back in a file are read together."""
    blocks: list[Block] = []
    where: dict[str, int] = {}
    chunks: list[Chunk] = []
    for shard_name, shard in shards.items():
        mine = {k: w for k, w in wants.items() if w.shard == shard_name and _nbytes(w, shard)}
        for group in _groups(mine):
            block = Block(mine[group[0]].device, shard_name)
            block.parts, block.nbytes = back_to_back((k, _nbytes(mine[k], shard)) for k in group)
            where.update(dict.fromkeys(block.parts, len(blocks)))
            blocks.append(block)
        segments = sorted((*w.segments(shard.slots[w.key]), where[k], blocks[where[k]].parts[k])
                          for k, w in mine.items())
        chunks.extend(_chunks(shard_name, shard.data_start, segments, chunk_bytes))
    return Plan(blocks, chunks, where)


def _groups(wants: dict[str, Want]) -> list[list[str]]:
    """Parts sharing one allocation: all of a shard's on one accelerator; each its own on the CPU, where
    allocations are cheap and separate storages keep the tensors ``torch.save``-able."""
    by_device: dict[torch.device, list[str]] = {}
    groups = []
    for key, want in wants.items():
        if want.device.type == "cpu":
            groups.append([key])
        else:
            by_device.setdefault(want.device, []).append(key)
    return groups + list(by_device.values())


def _nbytes(want: Want, shard: SafetensorsFile) -> int:
    """Bytes of one placed part."""
    slot = shard.slots[want.key]
    return math.prod(want.shape(slot)) * slot.dtype.itemsize


def _chunks(shard_name: str, data_start: int, segments: list[tuple[int, int, int, int, int, int]],
            chunk_bytes: int) -> Iterator[Chunk]:
    """Segments (file begin, row bytes, rows, stride, block, offset there; in file order) batched into chunks of
    at most `chunk_bytes` read bytes: back-to-back bytes are one read, a strided slice's rows one strided read
    whose whole extent fits a chunk too (a local file reads it at once), a longer run split. One step per
    segment or chunk, so thousands of parts or strided rows cost little."""
    reads: list[Read] = []
    pieces: list[Piece] = []
    size = 0
    for begin, nbytes, rows, stride, block, dst in segments:
        todo = [(begin, nbytes, rows, stride, dst)]
        while todo:
            begin, nbytes, rows, stride, dst = todo.pop()
            if rows > 1 and nbytes > chunk_bytes:  # rows longer than a chunk: each row split like a whole part
                todo.extend((begin + i * stride, nbytes, 1, 0, dst + i * nbytes) for i in reversed(range(rows)))
                continue
            room = chunk_bytes - size
            take = min(rows, room // nbytes, (chunk_bytes - nbytes) // stride + 1) if rows > 1 else min(nbytes, room)
            if not take:  # the rows do not fit what is left of this chunk
                yield Chunk(shard_name, tuple(reads), tuple(pieces))
                reads, pieces, size = [], [], 0
                todo.append((begin, nbytes, rows, stride, dst))
                continue
            got = take * nbytes if rows > 1 else take
            last = reads[-1] if reads else None
            if rows == 1 and last is not None and last.rows == 1 and last.offset + last.nbytes == data_start + begin:
                reads[-1] = Read(last.offset, last.nbytes + take)
            else:
                reads.append(Read(data_start + begin, nbytes, take, stride) if rows > 1 else Read(data_start + begin, take))
            prev = pieces[-1] if pieces else None
            if prev is not None and prev.block == block and prev.dst + prev.nbytes == dst and prev.src + prev.nbytes == size:
                pieces[-1] = Piece(block, prev.src, prev.dst, prev.nbytes + got)
            else:
                pieces.append(Piece(block, size, dst, got))
            size += got
            if rows > 1 and take < rows:
                todo.append((begin + take * stride, nbytes, rows - take, stride, dst + got))
            elif rows == 1 and take < nbytes:
                todo.append((begin + take, nbytes - take, 1, 0, dst + take))
            if size == chunk_bytes:
                yield Chunk(shard_name, tuple(reads), tuple(pieces))
                reads, pieces, size = [], [], 0
    if reads:
        yield Chunk(shard_name, tuple(reads), tuple(pieces))


def load_parts(shards: dict[str, SafetensorsFile], wants: dict[str, Want], *,
               threads: int = THREADS, chunk_bytes: int = CHUNK_BYTES) -> dict[str, torch.Tensor]:
    """The asked-for parts, each on its device, as views of one block per shard and device."""
    loading = start_loading(shards, wants, threads=threads, chunk_bytes=chunk_bytes)
    loading.wait()
    return loading.parts


def start_loading(shards: dict[str, SafetensorsFile], wants: dict[str, Want], *,
                  threads: int = THREADS, chunk_bytes: int = CHUNK_BYTES) -> Loading:
    """`load_parts` that returns as soon as the reads have started, so the caller can build while they run."""
    plan = plan_reads(shards, wants, chunk_bytes)
    blocks = [_allocate(b) for b in plan.blocks]
    out = {}
    for key, want in wants.items():
        slot = shards[want.shard].slots[want.key]
        shape = want.shape(slot)
        if key not in plan.where:
            out[key] = torch.empty(shape, dtype=slot.dtype, device=want.device)
            continue
        block = plan.blocks[plan.where[key]]
        at = block.parts[key]
        out[key] = blocks[plan.where[key]][at:at + math.prod(shape) * slot.dtype.itemsize].view(slot.dtype).reshape(shape)
    files = {name: shard.file for name, shard in shards.items()}
    return fetch(files, plan.chunks, blocks, Loading(out, plan.nbytes), threads=threads, chunk_bytes=chunk_bytes)


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
