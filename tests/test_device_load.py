"""The threaded staging pipeline, run with a CPU "device": every part byte-equal to the mapped file's."""

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aockpt
from aockpt import codec, device_load, progress
from aockpt.errors import CorruptCheckpointError
from aockpt.fetch import CountedFile
from aockpt.reader import open_checkpoint, read_flat
from conftest import CASES, assert_same_tensor

CPU = torch.device("cpu")


def _state() -> dict[str, torch.Tensor]:
    """Parts of odd sizes and mixed dtypes, so chunk edges and alignment padding fall everywhere."""
    state = {f"w.{case}": make() for case, (_, make) in CASES.items()}
    state.update(odd=torch.arange(7, dtype=torch.uint8), half=torch.linspace(-3, 3, 15).reshape(3, 5).to(torch.bfloat16),
                 empty=torch.empty(0, 4), scalar=torch.tensor([2.5], dtype=torch.float64))
    return state


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    path = tmp_path_factory.mktemp("dl") / "p"
    aockpt.save(_state(), path, max_shard_size=20_000)
    return path


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _everything(ckpt) -> dict[str, device_load.Want]:
    return {key: device_load.Want(shard, key, CPU) for key, shard in ckpt.key_to_shard.items()}


@pytest.mark.parametrize("chunk_bytes,threads", [(1000, 3), (4099, 1), (1 << 20, 8)])
def test_parts_equal_the_mapped_file_byte_for_byte(packed, chunk_bytes, threads):
    ckpt = open_checkpoint(packed)
    assert len(ckpt.shards) > 1
    parts = device_load.load_parts(ckpt.shards, _everything(ckpt), threads=threads, chunk_bytes=chunk_bytes)
    for key, tensor in parts.items():
        stored = ckpt.part(key)
        assert (tensor.dtype, tensor.shape) == (stored.dtype, stored.shape)
        assert torch.equal(_bytes(tensor), _bytes(stored)), key
        assert tensor.storage_offset() * tensor.element_size() % device_load.ALIGN == 0
    storages = {parts[k].untyped_storage().data_ptr() for k in parts if parts[k].numel()}
    assert len(storages) == sum(1 for p in parts.values() if p.numel())  # on the CPU: one allocation per part
    plan = device_load.plan_reads(ckpt.shards, {k: device_load.Want(w.shard, k, torch.device("meta"))
                                                for k, w in _everything(ckpt).items()})
    assert len(plan.blocks) == len(ckpt.shards)  # on an accelerator: one per shard and device


def test_plan_reads_only_asked_bytes_in_bounded_chunks(packed):
    ckpt = open_checkpoint(packed)
    keys = sorted(ckpt.key_to_shard)[::3]
    placement = {k: device_load.Want(ckpt.key_to_shard[k], k, CPU) for k in keys}
    plan = device_load.plan_reads(ckpt.shards, placement, chunk_bytes=777)
    sizes = {k: ckpt.shards[w.shard].slots[k].end - ckpt.shards[w.shard].slots[k].begin for k, w in placement.items()}
    assert plan.nbytes == sum(sizes.values())
    assert all(0 < c.nbytes <= 777 and sum(p.nbytes for p in c.pieces) == c.nbytes for c in plan.chunks)
    covered = {}
    for chunk in plan.chunks:
        for p in chunk.pieces:
            covered[(p.block, p.dst)] = p.nbytes
    for key, size in sizes.items():
        if size:
            start = plan.blocks[plan.where[key]].parts[key]
            got, at = 0, start
            while got < size:
                got += covered.pop((plan.where[key], at))
                at = start + got
            assert got == size
    assert not covered


def test_rebuilt_tensors_equal_what_was_saved(packed):
    ckpt = open_checkpoint(packed)
    parts = device_load.load_parts(ckpt.shards, _everything(ckpt), threads=4, chunk_bytes=2048)
    expected = _state()
    for name in ckpt.entries:
        flat = read_flat(ckpt, name, parts.__getitem__)
        assert_same_tensor(codec.rebuild(flat, name, CPU), expected[name])


@pytest.mark.parametrize("chunk_bytes", [7, 40, 1 << 20])
@pytest.mark.parametrize("unmapped", [False, True], ids=["local-extent", "exact-rows"])
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_a_span_places_exactly_the_slice_of_the_stored_part(tmp_path, dim, unmapped, chunk_bytes):
    """A strided slice is one strided read per chunk: a local file reads each extent at once and packs the
    rows; a source that cannot be mapped (remote) reads exactly the rows' bytes. Rows longer than a chunk split."""
    whole = torch.arange(4 * 6 * 5, dtype=torch.int16).reshape(4, 6, 5)
    aockpt.save({"t": whole}, tmp_path / "p")
    files = []
    ckpt = open_checkpoint(tmp_path / "p", opener=lambda p: files.append(CountedFile(p, unmapped=unmapped)) or files[-1])
    (shard,) = ckpt.shards
    wants = {f"{dim}:{a}:{b}": device_load.Want(shard, "t", CPU, (dim, a, b)) for a, b in [(0, 1), (1, 3), (2, 4)]}
    plan = device_load.plan_reads(ckpt.shards, wants, chunk_bytes=chunk_bytes)
    assert all(c.nbytes <= chunk_bytes and (r.rows - 1) * r.stride + r.nbytes <= chunk_bytes
               for c in plan.chunks for r in c.reads)
    files[0].read = 0
    parts = device_load.load_parts(ckpt.shards, wants, threads=2, chunk_bytes=chunk_bytes)
    for key, want in wants.items():
        assert torch.equal(parts[key], whole.narrow(dim, want.span[1], want.span[2] - want.span[1])), key
    if unmapped:
        assert files[0].read == plan.nbytes == sum(p.numel() * 2 for p in parts.values())


def test_a_strided_slice_is_planned_in_steps_per_chunk_not_per_row(tmp_path):
    """A rowwise slice of a [4096, 512] part is 4096 runs; the plan holds a few strided reads, not 4096."""
    aockpt.save({"t": torch.zeros(4096, 512, dtype=torch.int8)}, tmp_path / "p")
    ckpt = open_checkpoint(tmp_path / "p")
    (shard,) = ckpt.shards
    plan = device_load.plan_reads(ckpt.shards, {"t": device_load.Want(shard, "t", CPU, (1, 256, 512))},
                                  chunk_bytes=1 << 20)
    assert [len(c.reads) for c in plan.chunks] == [2]  # each extent fits a chunk: 2 x 2048 rows
    assert [(r.nbytes, r.rows, r.stride) for c in plan.chunks for r in c.reads] == [(256, 2048, 512)] * 2


def test_views_exist_at_once_and_cancel_stops_every_worker(packed):
    ckpt = open_checkpoint(packed)
    loading = device_load.start_loading(ckpt.shards, _everything(ckpt), threads=3, chunk_bytes=64)
    assert set(loading.parts) == set(ckpt.key_to_shard)  # wrappers can be built while the bytes arrive
    loading.cancel()
    assert not any(w.is_alive() for w in loading.workers)
    loading = device_load.start_loading(ckpt.shards, _everything(ckpt), threads=3, chunk_bytes=64)
    loading.wait()
    assert all(torch.equal(_bytes(loading.parts[k]), _bytes(ckpt.part(k))) for k in ckpt.key_to_shard)


def test_a_person_watching_sees_the_bytes_being_read(packed, monkeypatch, capsys):
    monkeypatch.setattr(progress, "enabled", lambda: True)
    ckpt = open_checkpoint(packed)
    device_load.load_parts(ckpt.shards, _everything(ckpt), threads=2, chunk_bytes=1024)
    assert "reading" in capsys.readouterr().err  # click prints the label alone when stderr is not a terminal


@pytest.mark.parametrize("span", [None, (1, 0, 50)], ids=["whole", "strided-extent"])
def test_file_truncated_after_opening_is_one_clear_error(tmp_path, span):
    aockpt.save({"a": torch.arange(5000.0).reshape(50, 100)}, tmp_path / "p")
    ckpt = open_checkpoint(tmp_path / "p")
    (name, shard), = ckpt.shards.items()
    os.truncate(shard.path, shard.data_start + 100)
    wants = {"a": device_load.Want(name, "a", CPU, span)}
    with pytest.raises(CorruptCheckpointError, match="ended while reading"):
        device_load.load_parts(ckpt.shards, wants, threads=2, chunk_bytes=1024)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_load_equals_what_was_saved_byte_for_byte(packed):
    info = aockpt.inspect(packed, devices=["cuda"])
    names = [t.name for t in info.tensors if t.devices["cuda"].loads]
    on_gpu = aockpt.load_quantized(packed, "cuda", keys=names)
    expected = _state()
    for name in names:
        assert on_gpu[name].device.type == "cuda"
        assert_same_tensor(on_gpu[name].cpu(), expected[name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_load_the_gpu_has_no_room_for_is_one_clear_error(tmp_path):
    aockpt.save({"big": torch.zeros(128 << 20, dtype=torch.uint8)}, tmp_path / "p")
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(free - (64 << 20), dtype=torch.uint8, device="cuda")  # leave 64 MB: the GPU really is full
    try:
        with pytest.raises(aockpt.DeviceMemoryError, match=r"cuda:0 has no room for the 1 tensors of model.safetensors"):
            aockpt.load_quantized(tmp_path / "p", "cuda")
    finally:
        del hog
        torch.cuda.empty_cache()


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=3), data=st.data(),
       chunk_bytes=st.integers(1, 300), unmapped=st.booleans())
def test_any_span_in_any_chunking_gives_the_slice(tmp_path_factory, shape, data, chunk_bytes, unmapped):
    """Strided reads split across chunks, rows longer than a chunk, extents: every span of every dim, exact."""
    whole = torch.arange(math.prod(shape), dtype=torch.int16).reshape(shape)
    path = tmp_path_factory.mktemp("span") / "p"
    aockpt.save({"t": whole}, path)
    ckpt = open_checkpoint(path, opener=lambda p: CountedFile(p, unmapped=unmapped))
    (shard,) = ckpt.shards
    dim = data.draw(st.integers(0, len(shape) - 1))
    start = data.draw(st.integers(0, shape[dim]))
    stop = data.draw(st.integers(start, shape[dim]))
    plan = device_load.plan_reads(ckpt.shards, {"s": device_load.Want(shard, "t", CPU, (dim, start, stop))},
                                  chunk_bytes=chunk_bytes)
    assert all(c.nbytes <= chunk_bytes and (r.rows - 1) * r.stride + r.nbytes <= chunk_bytes
               for c in plan.chunks for r in c.reads)
    parts = device_load.load_parts(ckpt.shards, {"s": device_load.Want(shard, "t", CPU, (dim, start, stop))},
                                   threads=2, chunk_bytes=chunk_bytes)
    assert torch.equal(parts["s"], whole.narrow(dim, start, stop - start))
