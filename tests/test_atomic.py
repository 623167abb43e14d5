"""Crash-safe writes: a writer killed at any point leaves the destination absent or complete, its temporary
files are removed by the next write, Ctrl-C leaves nothing, and a full disk gives one clear error."""

from __future__ import annotations

import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import aockpt
from aockpt.atomic import TEMP_MARK, remove_stale
from aockpt.errors import AockptError, UsageError

# A fork server: imports torch and aockpt once, builds a multi-shard state and a packed source, then for
# each "save DST" / "pack DST" line forks a writer, prints its pid, and prints its exit status when reaped.
SERVER = r"""
import os, sys
os.environ["AOCKPT_NO_PROGRESS"] = "1"
import torch, aockpt
from torchao.quantization import Int8WeightOnlyConfig, quantize_
torch.set_num_threads(1)
gen = torch.Generator().manual_seed(0)
layers = torch.nn.Sequential(*[torch.nn.Linear(256, 512, bias=True) for _ in range(6)]).to(torch.bfloat16)
quantize_(layers, Int8WeightOnlyConfig())
state = {**layers.state_dict(), **{f"plain.{i}": torch.randn(256, 1024, generator=gen) for i in range(6)}}
SHARD = 600_000
src = sys.argv[1]
aockpt.save(state, src, max_shard_size=SHARD)
print("ready", flush=True)
for line in sys.stdin:
    op, dst = line.split()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if op == "save":
                aockpt.save(state, dst, max_shard_size=SHARD)
            else:
                aockpt.pack(src, dst, max_shard_size=SHARD)
        except BaseException:
            code = 3
        os._exit(code)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""


class Server:
    """The fork server process and a way to run one writer under a signal."""

    def __init__(self, tmp: Path):
        self.src = tmp / "src"
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(self.src)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert self.proc.stdout.readline().strip() == "ready"

    def write(self, op: str, dst: Path, *, sig: int | None = None, after: float = 0.0) -> tuple[int, int]:
        """Start one writer; send it `sig` after `after` seconds; returns (pid, wait status)."""
        self.proc.stdin.write(f"{op} {dst}\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline())
        if sig is not None:
            time.sleep(after)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pid, int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server"))
    yield s
    s.close()


def leftovers(dst: Path) -> list[Path]:
    """Temporary entries beside `dst`."""
    return sorted(p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}{TEMP_MARK}"))


def timed(server: Server, op: str, dst: Path) -> float:
    """Seconds one uninterrupted write takes (it must succeed)."""
    start = time.perf_counter()
    _, status = server.write(op, dst)
    assert status == 0
    return time.perf_counter() - start


@pytest.mark.parametrize("op", ["save", "pack"])
def test_sigkill_leaves_destination_absent_or_complete(server, tmp_path, op):
    rng = random.Random(7)
    duration = timed(server, op, tmp_path / "reference")
    reference = aockpt.load_quantized(tmp_path / "reference")
    assert len([p for p in (tmp_path / "reference").iterdir() if p.suffix == ".safetensors"]) >= 4
    killed_mid_write = 0
    for i in range(6):
        dst = tmp_path / f"out{i}"
        pid, status = server.write(op, dst, sig=signal.SIGKILL, after=rng.uniform(0.0, duration))
        left = leftovers(dst)
        assert all(p.name.startswith(f".{dst.name}{TEMP_MARK}{pid}-") for p in left), left
        if dst.exists():
            aockpt.verify(dst)
            state = aockpt.load_quantized(dst)
            assert all(torch.equal(state[k].dequantize() if hasattr(state[k], "qdata") else state[k],
                                   v.dequantize() if hasattr(v, "qdata") else v) for k, v in reference.items())
        else:
            killed_mid_write += bool(left)
        assert remove_stale(dst) == left  # what the next write to dst does first
        assert leftovers(dst) == []
    assert killed_mid_write >= 1  # the delays do land inside the write


def test_sigint_leaves_nothing(server, tmp_path):
    duration = timed(server, "save", tmp_path / "reference")
    dst = tmp_path / "out"
    _, status = server.write("save", dst, sig=signal.SIGINT, after=duration / 3)
    assert os.waitstatus_to_exitcode(status) == 3  # KeyboardInterrupt reached the writer's except
    assert not dst.exists() and leftovers(dst) == []


def test_next_write_removes_only_dead_writers_temp_files(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dst = tmp_path / "ckpt"
    stale = tmp_path / f".ckpt{TEMP_MARK}{int(dead.stdout)}-abc"
    live = tmp_path / f".ckpt{TEMP_MARK}{os.getppid()}-def"
    other = tmp_path / f".ckpt2{TEMP_MARK}{int(dead.stdout)}-abc"
    for p in (stale, live, other):
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"partial")
    aockpt.save({"x": torch.ones(2)}, dst)
    assert not stale.exists() and live.exists() and other.exists()
    aockpt.verify(dst)


def test_replacing_with_force_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    aockpt.save({"x": torch.ones(2)}, tmp_path / "ckpt")
    with pytest.raises(TypeError):
        aockpt.save({"x": torch.ones(2), "bad": object()}, tmp_path / "ckpt", force=True)
    assert torch.equal(aockpt.load_quantized(tmp_path / "ckpt")["x"], torch.ones(2))
    aockpt.save({"x": torch.zeros(2)}, tmp_path / "ckpt", force=True)
    assert torch.equal(aockpt.load_quantized(tmp_path / "ckpt")["x"], torch.zeros(2))
    assert leftovers(tmp_path / "ckpt") == []


def _assert_clean_full_disk_error(dst: Path) -> None:
    """Saving 4 MB into too little space: one clear error, nothing left behind."""
    state = {"w": torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))}
    with pytest.raises(AockptError, match="no space left on device writing .*nothing was written"):
        aockpt.save(state, dst)
    assert not dst.exists() and leftovers(dst) == []


def test_file_size_limit_gives_a_clear_error(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
    try:
        _assert_clean_full_disk_error(tmp_path / "ckpt")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_full_tmpfs_gives_a_clear_error(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 1 MB tmpfs here ({mounted.stderr.decode().strip()}); "
                    "test_file_size_limit_gives_a_clear_error covers the same path with RLIMIT_FSIZE")
    try:
        _assert_clean_full_disk_error(disk / "ckpt")
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def _overlapping_cases(tmp_path: Path) -> list[tuple[Path, Path]]:
    """(src, dst) pairs where dst is the source, inside it, or contains it."""
    folder = tmp_path / "model"
    return [(folder, folder), (folder / "model.safetensors", folder), (folder, folder / "packed"),
            (folder, tmp_path), (folder / "model.safetensors", folder / "model.safetensors")]


@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("op", ["pack", "unpack"])
def test_destination_overlapping_the_source_is_refused_even_with_force(tmp_path, case, op):
    folder = aockpt.save({"w": torch.arange(8, dtype=torch.float32)}, tmp_path / "model")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (folder / "notes.md").write_text("mine")
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    src, dst = _overlapping_cases(tmp_path)[case]
    with pytest.raises(UsageError, match="overlaps the source .*with or without --force"):
        getattr(aockpt, op)(src, dst, force=True)
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before


@pytest.mark.parametrize("verb", ["save", "unpack"])
def test_an_unwritable_destination_is_an_output_error_naming_it(tmp_path, verb):
    """Errors of the output path itself (not only a full disk) come out as OutputError naming it."""
    from aockpt.errors import OutputError

    state = {"w": torch.zeros(4)}
    aockpt.save(state, tmp_path / "packed")
    (tmp_path / "file").write_bytes(b"x")
    dst = tmp_path / "file" / "out"
    call = {"save": lambda: aockpt.save(state, dst), "unpack": lambda: aockpt.unpack(tmp_path / "packed", dst)}
    with pytest.raises(OutputError, match=rf"could not write {re.escape(str(dst))} \("):
        call[verb]()
    assert (tmp_path / "file").read_bytes() == b"x"
