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
import tempfile
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


@pytest.mark.parametrize("point", ["staged", "written"])
def test_sigint_leaves_nothing(racer, tmp_path, point):
    """Ctrl-C at the start of the write or once all is written (mid-write: tests/test_cli.py's signal test)."""
    dst = tmp_path / "new" / "out"
    assert racer.wait(racer.start(dst, op="save", fault=f"{point}:SIGINT")) == 3  # KeyboardInterrupt reached it
    assert sorted(tmp_path.iterdir()) == []


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


# --- races and kills at each step (aockpt/atomic.py's AOCKPT_FAULT points) ----------------------------------

# A second fork server: each "start OP FORCE FALLBACK FAULT DST" line forks a writer that sets AOCKPT_FAULT
# (and, with FALLBACK=1, runs without renameat2, as on a file system lacking it) and prints its pid;
# "wait PID" prints its exit code: 0 written, 2 UsageError, 8 OutputError, 3 anything else.
RACER = r"""
import os, sys
os.environ["AOCKPT_NO_PROGRESS"] = "1"
import torch, aockpt, aockpt.atomic
from aockpt.errors import OutputError, UsageError
torch.set_num_threads(1)
state = {f"b{i}": torch.full((64, 64), float(i)) for i in range(4)}
aockpt.save(state, sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    words = line.split()
    if words[0] == "wait":
        print(os.waitstatus_to_exitcode(os.waitpid(int(words[1]), 0)[1]), flush=True)
        continue
    _, op, force, fallback, fault, dst = words
    pid = os.fork()
    if pid == 0:
        os.environ["AOCKPT_FAULT"] = "" if fault == "-" else fault
        if fallback == "1":
            aockpt.atomic._renameat2 = None
        try:
            if op == "pack":
                aockpt.pack(sys.argv[1], dst, force=force == "1")
            else:
                aockpt.save(state, dst, force=force == "1")
            code = 0
        except UsageError:
            code = 2
        except OutputError:
            code = 8
        except BaseException:
            code = 3
        os._exit(code)
    print(pid, flush=True)
"""
OLD = {"a": torch.arange(10, dtype=torch.float32)}  # what the destination holds before a forced replacement


class Racer:
    """The fork server and the writers it starts."""

    def __init__(self, tmp: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", RACER, str(tmp / "src")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert self.proc.stdout.readline().strip() == "ready"

    def _ask(self, line: str) -> int:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def start(self, dst: Path, *, force: bool = False, fallback: bool = False, fault: str = "-",
              op: str = "pack") -> int:
        return self._ask(f"start {op} {int(force)} {int(fallback)} {fault} {dst}")

    def wait(self, pid: int) -> int:
        return self._ask(f"wait {pid}")


@pytest.fixture(scope="module")
def racer(tmp_path_factory):
    r = Racer(tmp_path_factory.mktemp("racer"))
    yield r
    r.proc.stdin.close()
    r.proc.wait(timeout=30)


def wait_stopped(pid: int) -> None:
    """Wait until a process has stopped itself (SIGSTOP at a fault point)."""
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline
        time.sleep(0.01)


def beside(dst: Path) -> list[str]:
    """Everything aockpt may leave beside `dst`: temporary, aside and lock entries."""
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.aockpt-"))


def holds(dst: Path) -> str:
    """Which whole checkpoint `dst` is: "old" (OLD) or "new" (the racer's source); it must verify."""
    aockpt.verify(dst)
    names = sorted(aockpt.load_quantized(dst))
    assert names in (["a"], ["b0", "b1", "b2", "b3"]), names
    return "old" if names == ["a"] else "new"


def next_write_recovers(dst: Path) -> None:
    """Run what the next write to `dst` runs first (a refused one, so it changes nothing else)."""
    with pytest.raises(UsageError, match="already exists"):
        aockpt.save({"z": torch.zeros(1)}, dst)


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "aside"])
@pytest.mark.parametrize("point, after", [("staged", "old"), ("written", "old"), ("aside", "old"),
                                          ("placed", "new")])
def test_a_kill_at_any_step_of_a_forced_replacement_leaves_one_whole_checkpoint(racer, tmp_path, point, after,
                                                                                fallback):
    if point == "aside" and not fallback:
        pytest.skip("RENAME_EXCHANGE has no step between moving the old entry away and the new one in")
    dst = aockpt.save(OLD, tmp_path / "ckpt")
    assert racer.wait(racer.start(dst, force=True, fallback=fallback, fault=f"{point}:SIGKILL")) == -signal.SIGKILL
    if point == "aside":
        assert not dst.exists()  # the one moment without a destination: the next write puts the old one back
    else:
        assert holds(dst) == after
    next_write_recovers(dst)
    assert holds(dst) == after and beside(dst) == []
    assert racer.wait(racer.start(dst, force=True, fallback=fallback)) == 0
    assert holds(dst) == "new" and beside(dst) == []


@pytest.mark.parametrize("point", ["staged", "written"])
def test_a_kill_before_the_commit_leaves_no_destination(racer, tmp_path, point):
    dst = tmp_path / "new" / "ckpt"
    assert racer.wait(racer.start(dst, fault=f"{point}:SIGKILL")) == -signal.SIGKILL
    assert not dst.exists()
    aockpt.save(OLD, dst)  # recovers first
    assert holds(dst) == "old" and beside(dst) == []


def _occupy(dst: Path, what: str) -> None:
    """Put a user's entry at `dst`."""
    if what == "link":
        dst.symlink_to(dst.parent / "elsewhere")
    elif what == "file":
        dst.write_text("mine")
    else:
        dst.mkdir()
        if what == "folder":
            (dst / "notes.md").write_text("mine")


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "plain-rename"])
@pytest.mark.parametrize("what", ["folder", "file", "link", "empty folder"])
def test_what_appears_at_the_destination_during_a_write_is_kept(racer, tmp_path, what, fallback):
    """The issue's loss: a folder made at the destination while a pack without --force ran was deleted."""
    for op in ("pack", "save"):
        dst = tmp_path / op
        pid = racer.start(dst, op=op, fallback=fallback, fault="written:SIGSTOP")
        wait_stopped(pid)
        _occupy(dst, what)
        os.kill(pid, signal.SIGCONT)
        code = racer.wait(pid)
        if what == "empty folder":  # holds nothing: a valid destination, replaced atomically
            assert code == 0 and holds(dst) == "new"
        else:
            assert code == 2
            assert (dst.read_text() if what == "file" else os.readlink(dst) if what == "link"
                    else (dst / "notes.md").read_text()) == ("mine" if what != "link" else str(tmp_path / "elsewhere"))
        assert beside(dst) == []


@pytest.mark.parametrize("force", [False, True])
def test_two_writers_to_one_destination(racer, tmp_path, force):
    """Without force exactly one of two concurrent packs succeeds; with force both do; one whole checkpoint."""
    dst = tmp_path / "ckpt"
    pids = [racer.start(dst, force=force, fault="written:SIGSTOP") for _ in range(2)]
    for pid in pids:
        wait_stopped(pid)
    for pid in pids:
        os.kill(pid, signal.SIGCONT)
    codes = sorted(racer.wait(pid) for pid in pids)
    assert codes == ([0, 0] if force else [0, 2])
    assert holds(dst) == "new" and beside(dst) == []


def test_an_interrupted_swap_of_an_earlier_version_is_restored_never_deleted(tmp_path):
    """Earlier aockpt left the old checkpoint as `.<dst>.aockpt-tmp-<pid>-old` when killed mid-swap."""
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    dst = tmp_path / "ckpt"
    aockpt.save(OLD, tmp_path / f".ckpt{TEMP_MARK}{dead}-old")
    aockpt.save({"b0": torch.ones(1)}, tmp_path / f".ckpt{TEMP_MARK}{dead}-abcd1234")  # the complete new one
    aockpt.save({"z": torch.zeros(1)}, tmp_path / "other")  # a write elsewhere leaves them alone
    assert len(beside(dst)) == 2
    next_write_recovers(dst)
    assert holds(dst) == "old" and beside(dst) == []
    aside = tmp_path / f".ckpt{TEMP_MARK}{dead}-old"
    aockpt.save(OLD, aside)  # an aside entry whose replacement cannot be proven, beside a destination: kept
    next_write_recovers(dst)
    assert beside(dst) == [aside.name] and holds(aside) == "old"


@pytest.mark.parametrize("verb", ["pack", "save", "save_pretrained", "unpack"])
def test_an_empty_folder_is_a_destination_and_a_non_empty_one_needs_force(tmp_path, verb):
    from conftest import tiny_model

    src = aockpt.save({"w": torch.arange(6, dtype=torch.float32)}, tmp_path / "src")
    (src / "config.json").write_text("{}\n")  # a model folder (unpack writes a folder); no model the tensor can't back
    write = {"pack": lambda d, **k: aockpt.pack(src, d, **k),
             "save": lambda d, **k: aockpt.save({"w": torch.ones(3)}, d, **k),
             "save_pretrained": lambda d, **k: aockpt.save_pretrained(tiny_model(tie=False), d, **k),
             "unpack": lambda d, **k: aockpt.unpack(src, d, **k)}[verb]
    empty = Path(tempfile.mkdtemp(dir=tmp_path))
    write(empty)
    assert any(empty.iterdir()) and beside(empty) == []
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.md").write_text("mine")
    with pytest.raises(UsageError, match="already exists and is not empty; pass --force"):
        write(full)
    assert [p.name for p in full.iterdir()] == ["notes.md"]
    write(full, force=True)
    assert not (full / "notes.md").exists() and beside(full) == []


def test_a_failed_write_removes_the_parent_folders_it_made_and_no_others(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "keep").mkdir()  # empty, but not made by the write
    with pytest.raises(TypeError):
        aockpt.save({"x": torch.ones(2), "bad": object()}, tmp_path / "new" / "a" / "b" / "dst")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["new", "new/keep"]


def test_the_cli_refuses_a_folder_made_during_the_pack_in_one_line(tmp_path):
    src = aockpt.save({"w": torch.arange(6, dtype=torch.float32)}, tmp_path / "src")
    dst = tmp_path / "dst"
    proc = subprocess.Popen([sys.executable, "-m", "aockpt.cli", "pack", src, dst], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "AOCKPT_FAULT": "written:SIGSTOP"})
    wait_stopped(proc.pid)
    dst.mkdir()
    (dst / "notes.md").write_text("mine")
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1 and "appeared while" in err, err
    assert [p.name for p in dst.iterdir()] == ["notes.md"] and beside(dst) == []


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "aside"])
def test_a_writer_waits_while_another_holds_the_destinations_lock(racer, tmp_path, fallback):
    """A writer stopped mid-replacement (the old entry aside, on the fallback path) holds the lock: a second
    writer waits for it instead of recovering or committing around it."""
    dst = aockpt.save(OLD, tmp_path / "ckpt")
    first = racer.start(dst, force=True, fallback=fallback, fault=f"{'aside' if fallback else 'placed'}:SIGSTOP")
    wait_stopped(first)
    second = racer.start(dst, op="save")
    time.sleep(2)
    assert Path(f"/proc/{second}/stat").read_text().rsplit(")", 1)[1].split()[0] == "S"  # asleep in flock
    os.kill(first, signal.SIGCONT)
    assert racer.wait(first) == 0 and racer.wait(second) == 2  # the second then finds the new checkpoint there
    assert holds(dst) == "new" and beside(dst) == []


def test_entries_beside_the_destination_are_never_followed(tmp_path):
    """A link named like a dead writer's staging entry is removed as a link; a link at the lock's name is refused."""
    from aockpt.errors import OutputError

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "mine.txt").write_text("mine")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / f".ckpt{TEMP_MARK}{dead}-abcd1234").symlink_to(outside)
    aockpt.save(OLD, tmp_path / "out" / "ckpt")
    assert beside(tmp_path / "out" / "ckpt") == [] and (outside / "mine.txt").read_text() == "mine"

    (tmp_path / "out" / ".other.aockpt-lock").symlink_to(outside / "lockfile")
    with pytest.raises(OutputError, match="could not write"):
        aockpt.save(OLD, tmp_path / "out" / "other")
    assert sorted(p.name for p in outside.iterdir()) == ["mine.txt"] and not (tmp_path / "out" / "other").exists()
