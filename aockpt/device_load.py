"""Place stage of the load pipeline: each asked-for part gets a home on its device, and the reads that fill it.

Each (shard, device) pair gets one allocation (a ``Block``); parts are ALIGN-aligned views into it. The
reads are chunks of contiguous file bytes, each split into the pieces that go to their blocks; the fetch
stage (aockpt.fetch) runs them through whatever byte source holds the file. The same code runs with a CPU
"device" (plain buffers, synchronous copies), which is how tests check it without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from .errors import DeviceMemoryError
from .fetch import CHUNK_BYTES, THREADS, Chunk, Loading, Piece, fetch
from .safetensors_io import SafetensorsFile

ALIGN = 256  # bytes: every part starts where a fresh CUDA allocation would, so kernels see aligned pointers


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
