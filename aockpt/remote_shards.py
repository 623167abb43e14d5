"""Safetensors shards read by range from a remote file: the header first, then only the tensors asked for.

A `RemoteShard` is a SafetensorsFile over a remote aockpt.fetch.ByteFile, so the reader, the loaders and
tensor parallelism run on it unchanged; opening reads the header alone (aockpt.fetch.read_header) and
checks it with the same parser as local files. `fetch_parts` then reads the wanted tensors of every shard
concurrently into host buffers (one per run of adjacent tensors), and checks digests in the reading threads as each tensor's
last byte arrives. Slices and device loads go through the fetch engine (aockpt.fetch) like local files.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CorruptCheckpointError
from .fetch import ByteFile
from .remote_io import REQUEST_BYTES, concurrency
from .safetensors_io import SafetensorsFile, TensorSlot, sha256_hex



class RemoteShard(SafetensorsFile):
    """A safetensors file over a remote aockpt.fetch.ByteFile: header read and checked as for a local file;
    whole tensors for the host are fetched concurrently (`fetch_parts`) and kept."""

    def __init__(self, file: ByteFile, path: Path):
        super().__init__(file)
        self.path = path  # the staging folder's name for it, printed as its URL
        self._fetched: dict[str, torch.Tensor] = {}

    def tensor(self, key: str) -> torch.Tensor:
        """A fetched tensor, or this one read now (one range request)."""
        if key not in self._fetched:
            fetch_parts({"": self}, {"": [key]}, {})
        return self._fetched[key]

    def raw_bytes(self, key: str) -> memoryview:
        """The stored bytes of one tensor (fetched first if needed)."""
        tensor = self.tensor(key)
        return memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")


@dataclass
class _Chunk:
    """One range request: `nbytes` at `offset` of a shard's file into `view`, covering some keys."""

    shard: str
    offset: int
    view: memoryview
    keys: tuple[str, ...]


def fetch_parts(shards: dict[str, RemoteShard], keys: dict[str, list[str]], digests: dict[str, str]) -> int:
    """Read the given keys of each shard concurrently into one host buffer per shard; returns bytes read.

    Adjacent tensors are read as one run, runs are cut into REQUEST_BYTES requests, and a tensor whose
    recorded digest is in `digests` is hashed by the thread that completes it (one fetched earlier, in
    memory, by the calling thread).

    Raises:
        CorruptCheckpointError: naming every tensor whose bytes do not match their digest (nothing kept).
        RemoteReadError: a range could not be read at the pinned version.
    """
    chunks, views, pending = [], {}, {}
    for shard_name, wanted in keys.items():
        shard = shards[shard_name]
        todo = sorted({k for k in wanted if k not in shard._fetched}, key=lambda k: shard.slots[k].begin)
        for run in _runs(shard.slots, todo):
            buf = torch.empty(run[-1][1].end - run[0][1].begin, dtype=torch.uint8)
            for key, slot in run:
                views[(shard_name, key)] = (buf, slot.begin - run[0][1].begin)
            chunks += _cut(shard_name, shard, run, buf)
    for c in chunks:
        for key in c.keys:
            pending[(c.shard, key)] = pending.get((c.shard, key), 0) + 1
    lock, bad = threading.Lock(), []

    def read(c: _Chunk) -> None:
        shards[c.shard].file.read_into([(c.offset, c.view)])
        with lock:
            finished = [k for k in c.keys if _count_down(pending, (c.shard, k))]
        for key in finished:
            if key in digests and _digest(views[(c.shard, key)], shards[c.shard].slots[key]) != digests[key]:
                with lock:
                    bad.append(key)

    with ThreadPoolExecutor(min(concurrency(), max(1, len(chunks))), thread_name_prefix="aockpt-fetch") as pool:
        for done in [pool.submit(read, c) for c in chunks]:
            done.result()
    bad += [k for name, wanted in keys.items() for k in wanted if k in shards[name]._fetched and k in digests
            and sha256_hex(shards[name].raw_bytes(k)) != digests[k]]
    if bad:
        raise CorruptCheckpointError(
            f"{next(iter(shards.values())).path}: {len(bad)} tensor part(s) do not match their recorded digest: "
            f"{', '.join(sorted(bad)[:10])}; the stored files were modified or damaged: re-upload or re-pack them")
    for (shard_name, key), (buf, at) in views.items():
        shards[shard_name]._fetched[key] = _as_tensor(buf, at, shards[shard_name].slots[key])
    return sum(len(c.view) for c in chunks)


def _runs(slots: dict[str, TensorSlot], ordered: list[str]) -> list[list[tuple[str, TensorSlot]]]:
    """Keys (in file order) grouped into runs of byte-adjacent tensors."""
    runs: list[list[tuple[str, TensorSlot]]] = []
    for key in ordered:
        slot = slots[key]
        if runs and runs[-1][-1][1].end == slot.begin:
            runs[-1].append((key, slot))
        else:
            runs.append([(key, slot)])
    return runs


def _cut(shard_name: str, shard: RemoteShard, run: list[tuple[str, TensorSlot]], buf: torch.Tensor) -> list[_Chunk]:
    """A run as requests of at most REQUEST_BYTES, each listing the keys it overlaps."""
    base, size = run[0][1].begin, buf.numel()
    view = memoryview(buf.numpy()) if size else memoryview(b"")
    out = []
    for lo in range(0, size, REQUEST_BYTES):
        hi = min(size, lo + REQUEST_BYTES)
        keys = tuple(k for k, s in run if s.begin - base < hi and s.end - base > lo)
        out.append(_Chunk(shard_name, shard.data_start + base + lo, view[lo:hi], keys))
    return out


def _count_down(pending: dict[tuple[str, str], int], key: tuple[str, str]) -> bool:
    """One more chunk of a key arrived; whether it was the last."""
    pending[key] -= 1
    return pending[key] == 0


def _digest(where: tuple[torch.Tensor, int], slot: TensorSlot) -> str:
    """sha256 of one tensor's bytes inside its run buffer."""
    buf, at = where
    n = slot.end - slot.begin
    return sha256_hex(memoryview(buf[at:at + n].numpy()) if n else memoryview(b""))


def _as_tensor(buf: torch.Tensor, at: int, slot: TensorSlot) -> torch.Tensor:
    """A tensor viewing its bytes in a run buffer (copied only where misaligned for its dtype), with a storage of
    its own as a mapped local file's tensors have, so torch.save keeps tensors of several dtypes apart."""
    n = slot.end - slot.begin
    if n == 0:
        return torch.empty(slot.shape, dtype=slot.dtype)
    raw = torch.frombuffer(memoryview(buf.numpy())[at:at + n], dtype=torch.uint8)  # a storage of its own
    if raw.data_ptr() % slot.dtype.itemsize:
        raw = raw.clone()
    return raw.view(slot.dtype).reshape(slot.shape)
