"""The shard writer: byte-identical output for any worker count, worker errors surface, memory stays bounded."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torchao.quantization import Int8Tensor

import aockpt
from aockpt import format as fmt
from aockpt.errors import OutputError, UnsupportedTensorError, UsageError
from aockpt.safetensors_io import SafetensorsFile
from aockpt.fetch import release_mapped
from aockpt.writer import write_packed
from aockpt.api import state_items


def _state(layers: int = 6, n: int = 64, k: int = 128) -> dict[str, torch.Tensor]:
    """A small Llama-like state dict: int8 linears, bf16 norms, and one tied pair."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for i in range(layers):
        qdata = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        state[f"layers.{i}.proj.weight"] = Int8Tensor(qdata, torch.rand(n, 1, generator=gen), [1, k], torch.bfloat16)
        state[f"layers.{i}.norm.weight"] = torch.rand(k, generator=gen).to(torch.bfloat16)
    state["embed.weight"] = torch.rand(32, k, generator=gen).to(torch.bfloat16)
    state["lm_head.weight"] = state["embed.weight"]
    return state


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("workers", [2, 3])
def test_output_is_byte_identical_whatever_the_worker_count(tmp_path, workers):
    state = _state()
    aockpt.save(state, tmp_path / "one", max_shard_size=20_000)
    aockpt.save(state, tmp_path / "many", max_shard_size=20_000, workers=workers)
    one = _files(tmp_path / "one")
    assert len([n for n in one if n.endswith(".safetensors")]) >= 3
    assert _files(tmp_path / "many") == one
    aockpt.pack(tmp_path / "one", tmp_path / "repacked", max_shard_size=20_000, workers=workers)
    assert _files(tmp_path / "repacked") == one


def test_parallel_pack_loads_exactly(tmp_path):
    state = _state()
    aockpt.save(state, tmp_path / "src")
    aockpt.pack(tmp_path / "src", tmp_path / "dst", max_shard_size=20_000, workers=2)
    loaded = aockpt.load_quantized(tmp_path / "dst", verify=True)
    for name, tensor in state.items():
        got = loaded[name]
        if isinstance(tensor, Int8Tensor):
            assert torch.equal(got.qdata, tensor.qdata) and torch.equal(got.scale, tensor.scale)
        else:
            assert torch.equal(got.view(torch.uint8), tensor.view(torch.uint8))
    assert loaded["lm_head.weight"] is loaded["embed.weight"]


def test_a_worker_error_reaches_the_caller_as_an_output_error(tmp_path):
    (tmp_path / "out" / "model-00002-of-00004.safetensors").mkdir(parents=True)
    with pytest.raises(OutputError, match=r"could not write .*model-00002-of-00004\.safetensors \(Is a directory\)"):
        write_packed(state_items(_state()), tmp_path / "out", max_shard_size=20_000, workers=2)


def test_workers_must_be_positive(tmp_path):
    with pytest.raises(UsageError, match="workers"):
        aockpt.save(_state(), tmp_path / "out", workers=0)


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page release is Linux-only")
def test_release_drops_mapped_pages_and_keeps_every_byte(tmp_path):
    big = torch.randint(-128, 128, (4096, 4096), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    aockpt.save({"w": big}, tmp_path / "src")
    with SafetensorsFile(tmp_path / "src" / "model.safetensors") as f:
        view = f.tensor("w")
        view.view(torch.uint8).max()
        before = _rss_file_kb()
        release_mapped([view])
        assert before - _rss_file_kb() > 12_000  # the 16 MiB of the view left this process
        assert torch.equal(view, big)  # and come back from the file, unchanged
    anonymous = big.clone()
    release_mapped([anonymous])
    assert torch.equal(anonymous, big)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux-only")
def test_pack_peak_memory_is_a_shard_not_the_checkpoint(tmp_path):
    """Packing 96 MiB in 8 MiB shards from a safetensors source raises peak RSS by well under the checkpoint."""
    gen = torch.Generator().manual_seed(2)
    aockpt.save({f"w{i}": torch.randint(-128, 128, (2048, 4096), generator=gen, dtype=torch.int8) for i in range(12)},
                tmp_path / "src")
    script = textwrap.dedent(f"""
        from pathlib import Path
        import aockpt
        import aockpt.api  # torch and torchao are imported before the baseline is taken
        def kb(field):
            return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field)).split()[1])
        Path("/proc/self/clear_refs").write_text("5")
        base = kb("VmRSS:")
        aockpt.pack({str(tmp_path / "src")!r}, {str(tmp_path / "dst")!r}, max_shard_size=9_000_000)
        print(kb("VmHWM:") - base)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth_mib = int(done.stdout.split()[-1]) / 1024
    assert growth_mib < 40, f"peak RSS grew by {growth_mib:.0f} MiB packing a 96 MiB checkpoint"
    assert len(list((tmp_path / "dst").glob("*.safetensors"))) == 12


@pytest.mark.parametrize("name", sorted(fmt.RESERVED_NAMES))
def test_names_the_format_reserves_are_refused_and_nothing_is_written(tmp_path, name):
    src = tmp_path / "src.pt"
    torch.save({name: torch.ones(2), "ok": torch.zeros(2)}, src)
    for write in (lambda: aockpt.save({name: torch.ones(2)}, tmp_path / "a"), lambda: aockpt.pack(src, tmp_path / "b")):
        with pytest.raises(UnsupportedTensorError, match=rf"'{name}' collide with keys the checkpoint format reserves"):
            write()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.pt"]


def test_per_tensor_work_does_not_grow_with_the_tensor_count(tmp_path, monkeypatch):
    """/proc/self/maps was read once per tensor (100k empty tensors took minutes); now once per shard."""
    from safetensors.torch import save_file

    from aockpt import fetch

    save_file({f"t{i}": torch.full((2,), float(i)) for i in range(3000)} | {f"e{i}": torch.empty(0) for i in range(3000)},
              str(tmp_path / "many.safetensors"))
    reads = []
    real = fetch._file_mappings
    monkeypatch.setattr(fetch, "_file_mappings", lambda: reads.append(1) or real())
    aockpt.pack(tmp_path / "many.safetensors", tmp_path / "out")
    assert len(reads) == 1
    assert torch.equal(aockpt.load_quantized(tmp_path / "out", keys=["t2999"])["t2999"], torch.full((2,), 2999.0))
