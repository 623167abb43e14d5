"""A pickle stream read opcode by opcode before torch runs it, without building anything.

torch's weights-only unpickler is safe about *what* a pickle may name, not about *how much* it may cost:
it runs any number of opcodes, admits ``bytearray(n)``, and (legacy container) allocates each storage
the size its record claims before reading it. This scan bounds all three first, and collects the device
types storages were saved from (the only trace of where a checkpoint was made).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import CorruptCheckpointError, UnsafeCheckpointError, reason

ZIP_MAGIC = b"PK\x03\x04"
_LOCATION = re.compile(r"(cpu|cuda|xpu|mps|npu|hpu|meta)(:\d+)?")
# torch's weights-only unpickler runs ~1M opcodes a second in Python; a state dict costs ~30 per tensor,
# so this admits ~160k tensors and keeps any pickle's load within seconds.
_MAX_OPCODES = 5_000_000
_MAX_PICKLE_BYTES = 128 * 1024 * 1024  # a zip's data.pkl is read whole to be scanned; ~110 bytes a tensor
# Globals torch's own weights-only set admits that allocate as much memory as an argument says
# (bytearray(2**31)); a state dict of tensors never needs them.
_SIZED_GLOBALS = frozenset({"builtins.bytearray", "__builtin__.bytearray"})
_MAX_LINE = 1 << 20  # protocol-0 opcodes (GLOBAL module/name lines) are short; no newline within it is junk
_LEGACY_PICKLES = 5  # magic number, protocol, sys_info, the object itself, then its storage keys
_MARK = object()


@dataclasses.dataclass
class PickleScan:
    """What a pickle stream says before anything is built: its globals, storage records and their devices."""

    opcodes: int = 0
    globals: set[str] = dataclasses.field(default_factory=set)
    locations: set[str] = dataclasses.field(default_factory=set)  # device types storages were saved from
    storages: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (storage class, elements)


class _BoundedReader(io.BufferedReader):
    """A stream that refuses any read asking for more bytes than remain: a pickle's length fields come from
    the file, and a buffered read allocates what it asks for before reading (4 GB for a BINUNICODE)."""

    def __init__(self, raw: io.RawIOBase, size: int):
        super().__init__(raw)
        self._size = size

    def read(self, n: int | None = -1) -> bytes:
        left = self._size - self.tell()
        if n is not None and n > left:
            raise ValueError(f"an opcode argument claims {n:,} bytes where {left:,} remain")
        return super().read(n)

    def readline(self, size: int | None = -1) -> bytes:
        """A text opcode's line, at most _MAX_LINE bytes (a legacy file holds gigabytes after its pickles)."""
        return super().readline(_MAX_LINE if size is None or size < 0 else min(size, _MAX_LINE))


def _pop_to_mark(stack: list[Any]) -> list[Any]:
    """Pop a MARK-delimited slice (an unbalanced stream yields what is there; torch refuses it later)."""
    items = []
    while stack and stack[-1] is not _MARK:
        items.append(stack.pop())
    if stack:
        stack.pop()
    return items[::-1]


def _effect(op: pickletools.OpcodeInfo) -> tuple[bool, int, int]:
    """(pops to a MARK, other items popped, items pushed) of one opcode, from pickletools' own table."""
    before = op.stack_before
    if pickletools.markobject in before:
        return True, before.index(pickletools.markobject), len(op.stack_after)
    return False, len(before), len(op.stack_after)


_EFFECTS = {op.name: _effect(op) for op in pickletools.opcodes}
_MEMO_PUT = frozenset({"BINPUT", "LONG_BINPUT", "PUT"})
_MEMO_GET = frozenset({"BINGET", "LONG_BINGET", "GET"})
_TUPLES = frozenset({"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"})


def _step(name: str, arg: Any, stack: list[Any], memo: dict[Any, Any], scan: PickleScan) -> None:
    """Apply one opcode to an abstract stack that keeps strings, ints, globals and tuples, nothing else."""
    if name in _MEMO_PUT or name == "MEMOIZE":
        memo[arg if name != "MEMOIZE" else len(memo)] = stack[-1] if stack else None
        return
    if name in _MEMO_GET:
        stack.append(memo.get(arg))
        return
    if name == "MARK":
        stack.append(_MARK)
        return
    if name == "GLOBAL":
        stack.append(("global", arg.replace(" ", ".")))
        return
    marked, below, after = _EFFECTS[name]
    popped = _pop_to_mark(stack) if marked else []
    if below:
        taken = stack[-below:]
        del stack[-below:]
        popped = popped if marked else taken
    if name in _TUPLES:
        stack.append(tuple(popped))
    elif name == "BINPERSID":
        _storage_record(popped[0] if popped else None, scan)
        stack.append(None)
    elif after == 1 and isinstance(arg, (str, int)):
        stack.append(arg)
    elif after:
        stack.extend([None] * after)


def _storage_record(pid: Any, scan: PickleScan) -> None:
    """Note a persistent id of the form ("storage", StorageClass, key, location, numel, ...)."""
    if (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], tuple)
            and isinstance(pid[3], str) and type(pid[4]) is int):
        scan.storages.append((str(pid[1][1]), pid[4]))


def _scan_stream(stream: BinaryIO, pickles: int, where: Path, *, sizes: bool) -> PickleScan:
    """Walk the first `pickles` pickles of a stream opcode by opcode, without building anything.

    With `sizes`, storage records are followed through an abstract stack (the legacy container
    allocates what they claim before reading); globals and location strings are always collected.
    """
    scan = PickleScan()
    for _ in range(pickles):
        if not stream.peek(1):  # a bare pickle file holds one pickle, the legacy container four and more
            break
        stack: list[Any] = []
        memo: dict[Any, Any] = {}
        for op, arg, _pos in pickletools.genops(stream):
            scan.opcodes += 1
            if scan.opcodes > _MAX_OPCODES:
                raise CorruptCheckpointError(
                    f"{where}: its pickle runs more than {_MAX_OPCODES:,} opcodes, far more than a state dict of "
                    "real tensors needs; refused before loading"
                )
            if op.name == "GLOBAL":
                scan.globals.add(arg.replace(" ", "."))
            elif type(arg) is str and _LOCATION.fullmatch(arg):
                scan.locations.add(arg.split(":")[0])
            if sizes:
                _step(op.name, arg, stack, memo, scan)
    return scan


def _itemsize(storage_class: str) -> int:
    """Bytes per element of a storage class named in a pickle (1 for untyped or unknown ones)."""
    short = storage_class.rsplit(".", 1)[-1]
    with contextlib.suppress(Exception):
        return torch.serialization.StorageType(short).dtype.itemsize
    return 1


@functools.lru_cache(maxsize=8)
def _scan_cached(path: Path, _stamp: tuple[int, int, int]) -> PickleScan:
    """The scan of one file version (the stamp is its inode, size and mtime)."""
    with _BoundedReader(open(path, "rb", buffering=0), path.stat().st_size) as f:
        if f.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
            f.seek(0)
            return _scan_stream(f, _LEGACY_PICKLES, path, sizes=True)
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        with z.open(name) as pkl:
            data = pkl.read(_MAX_PICKLE_BYTES + 1)
    if len(data) > _MAX_PICKLE_BYTES:
        raise CorruptCheckpointError(f"{path}: its pickle is larger than {_MAX_PICKLE_BYTES:,} bytes, far more than "
                                     "a state dict of real tensors needs; refused before loading")
    return _scan_stream(_BoundedReader(io.BytesIO(data), len(data)), 1, path, sizes=False)


def scan_pickle(path: Path) -> PickleScan:
    """Scan a checkpoint's pickle before torch runs it: opcode budget, sized globals, storage sizes.

    Raises:
        CorruptCheckpointError: more opcodes than _MAX_OPCODES, a storage claiming more bytes than the
            whole file holds, or a stream that is not pickle.
        UnsafeCheckpointError: a global that allocates what its argument says (bytearray).
    """
    stat = path.stat()
    try:
        scan = _scan_cached(path, (stat.st_ino, stat.st_size, stat.st_mtime_ns))
    except (ValueError, EOFError, StopIteration, zipfile.BadZipFile, pickle.UnpicklingError, UnicodeError) as e:
        raise CorruptCheckpointError(f"{path} could not be read as a torch checkpoint ({reason(e)}); "
                                     "it is truncated, corrupt, or not written by torch.save") from e
    sized = sorted(scan.globals & _SIZED_GLOBALS)
    if sized:
        raise UnsafeCheckpointError(
            f"{path} was refused: it uses {', '.join(map(repr, sized))}, which allocates as much memory as the "
            "file asks; a state dict of tensors never needs it. Nothing from the file was executed"
        )
    for storage_class, numel in scan.storages:
        if numel < 0 or numel * _itemsize(storage_class) > stat.st_size:
            raise CorruptCheckpointError(
                f"{path}: a storage claims {numel:,} elements of {storage_class}, more bytes than the whole "
                f"{stat.st_size:,}-byte file holds; refused before allocating"
            )
    return scan
