"""The fetch interface: a second byte source (here: bytes in memory, no mapping) serves every reader unchanged."""

import pytest
import torch

import aockpt
from aockpt import device_load, fetch
from aockpt.errors import CorruptCheckpointError
from aockpt.reader import open_checkpoint
from aockpt.safetensors_io import SafetensorsFile
from conftest import CASES


class MemoryFile:
    """A ByteFile over bytes held in memory and never mapped, as a remote source would be."""

    def __init__(self, data: bytes, where: str):
        self.data, self.where, self.size, self.version = data, where, len(data), str(hash(data))
        self.reads: list[tuple[int, int]] = []

    def read_into(self, reads):
        for offset, view in reads:
            if offset + len(view) > self.size:
                raise CorruptCheckpointError(f"{self.where} ended while reading it")
            view[:] = self.data[offset:offset + len(view)]
            self.reads.append((offset, len(view)))

    def mapped(self):
        return None

    def close(self):
        pass


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    path = tmp_path_factory.mktemp("fetch") / "p"
    aockpt.save({f"w.{case}": make() for case, (_, make) in CASES.items()}, path)
    return path


def test_an_unmapped_source_gives_the_same_bytes_as_the_local_file(packed):
    ckpt = open_checkpoint(packed)
    (name, local), = ckpt.shards.items()
    memory = MemoryFile(local.path.read_bytes(), f"mem://{name}")
    remote = SafetensorsFile(memory)
    assert (remote.slots, remote.metadata, remote.data_start) == (local.slots, local.metadata, local.data_start)
    placement = {key: device_load.Want(name, key, torch.device("cpu")) for key in local.keys()}
    memory.reads.clear()
    parts = device_load.load_parts({name: remote}, placement, threads=2, chunk_bytes=999)
    assert max(n for _, n in memory.reads) <= 999  # bounded reads, whatever the source
    for key in local.keys():
        assert torch.equal(parts[key].reshape(-1).view(torch.uint8), local.tensor(key).reshape(-1).view(torch.uint8))
        assert torch.equal(remote.tensor(key).reshape(-1).view(torch.uint8),
                           local.tensor(key).reshape(-1).view(torch.uint8))
        assert bytes(remote.raw_bytes(key)) == bytes(local.raw_bytes(key))


def test_a_header_longer_than_the_file_is_refused_before_reading_it():
    data = (10**6).to_bytes(8, "little") + b"{}"
    with pytest.raises(CorruptCheckpointError, match="header claims 1000000 bytes"):
        fetch.read_header(MemoryFile(data, "mem://x"))


def test_local_file_version_changes_when_the_file_does(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    first = fetch.LocalFile(path)
    path.write_bytes(b"abcd")
    second = fetch.LocalFile(path)
    assert first.version != second.version and second.size == 4
    buf = bytearray(4)
    second.read_into([(0, memoryview(buf))])
    assert buf == b"abcd"
    with pytest.raises(CorruptCheckpointError, match="truncated after opening"):
        second.read_into([(2, memoryview(bytearray(4)))])
