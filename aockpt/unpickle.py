"""Allowlisted ``torch.load``: torch's weights-only unpickler, widened only by aockpt's one table.

Nothing read from a file is imported, looked up by attribute, or matched by prefix: a pickle may name
exactly the globals in ``allowlist()`` (plus torch's own tensor-rebuild set), and the set in force
during a load is exactly that, whatever torchao or the caller registered process-wide.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import os
import pickle
import pickletools
import re
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from . import codec, legacy, registry
from .errors import AockptError, CorruptCheckpointError, UnsafeCheckpointError, reason
from .pickle_scan import ZIP_MAGIC, scan_pickle

# Pickle opcodes that name or call code and that torch's weights-only unpickler does not implement.
_CODE_OPCODES = frozenset({"STACK_GLOBAL", "INST", "OBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"})
_MAX_NODES = 10_000_000  # containers and leaves in the loaded object, counted as a tree
_MAX_DEPTH = 64  # nesting of containers; state dicts nest a handful of levels
_MAX_ZIP_MEMBERS = 1_000_000  # torch.save writes one member per storage plus five
# Members a torch.save zip holds under its one root folder (torch 1.6 to 2.13).
_ZIP_MEMBERS = re.compile(
    r"(data\.pkl|byteorder|version|\.format_version|\.storage_alignment|data/\d+|\.data/[\w.]+)"
)
_TAR_MAGIC_OFFSET, _TAR_MAGIC = 257, b"ustar"
_LOCK = threading.Lock()
_REFUSAL_PATTERNS = (
    re.compile(r"GLOBAL (.+?) was not an allowed global"),
    re.compile(r"GLOBAL (.+?) whose module .+? is blocked"),
    re.compile(r"unrecognized function (.+?)(?: which belongs to .*)?$", re.M),
    re.compile(r"Can only create new object .* but got (.+)$", re.M),
    re.compile(r"Can only build .* but got (.+)$", re.M),
)
_OPCODE_PATTERN = re.compile(r"Unsupported operand (\d+)")


def _enum_member(cls: type[enum.Enum]) -> Callable[[Any], enum.Enum]:
    """A one-argument member lookup standing in for an enum class, so no pickle can BUILD a shared member."""

    def member(value: Any) -> enum.Enum:
        return cls(value)

    member.__qualname__ = f"member_of_{cls.__qualname__}"
    return member


_ENUM_MEMBERS: dict[type, Callable[[Any], enum.Enum]] = {}


def _loadable(obj: type) -> object:
    """What the unpickler is given for an allowlisted class: the class, or a member lookup for an enum."""
    if isinstance(obj, type) and issubclass(obj, enum.Enum):
        return _ENUM_MEMBERS.setdefault(obj, _enum_member(obj))
    return obj


def _dotted(cls: type) -> str:
    """The name pickle writes for a class today."""
    return f"{cls.__module__}.{cls.__qualname__}"


def allowlist() -> list[tuple[object, str]]:
    """Every (object, exact dotted name) a checkpoint may name beyond torch's own rebuild functions."""
    classes = [*((t.cls, t.former_names) for t in registry.TENSOR_TYPES.values()),
               *((cls, registry.FORMER_VALUE_NAMES.get(n, ())) for n, cls in registry.VALUE_TYPES.items())]
    by_name: dict[str, object] = {}
    for cls, former in classes:
        for name in (_dotted(cls), *former):
            by_name.setdefault(name, _loadable(cls))
    for name, cls in legacy.STAND_INS.items():  # a name both tables hold keeps the registry's class
        by_name.setdefault(name, _loadable(cls))
    return [(obj, name) for name, obj in by_name.items()]


@contextlib.contextmanager
def _only_our_globals(pairs: list[tuple[object, str]]) -> Iterator[None]:
    """Make aockpt's table the whole user allowlist for the duration, then restore what was there."""
    with _LOCK:
        saved = torch.serialization.get_safe_globals()
        torch.serialization.clear_safe_globals()
        try:
            with torch.serialization.safe_globals(pairs):
                yield
        finally:
            torch.serialization.clear_safe_globals()
            torch.serialization.add_safe_globals(saved)


def _check_file(path: Path) -> None:
    """Refuse what is not a regular, non-empty file before torch sees it."""
    if not path.exists():
        raise CorruptCheckpointError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise CorruptCheckpointError(f"{path} is a directory; pass the checkpoint file inside it")
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(f"{path} is empty (0 bytes); the download or save was cut short")


def _check_zip_names(path: Path, names: list[str]) -> None:
    """A torch.save zip holds one `<dir>/data.pkl` and plain relative members under that one dir."""
    if len(names) > _MAX_ZIP_MEMBERS:
        raise CorruptCheckpointError(
            f"{path} has {len(names):,} zip members, more than the {_MAX_ZIP_MEMBERS:,} a torch.save file of "
            "any real model holds; refused"
        )
    if any(n.endswith("/constants.pkl") or "/code/" in f"/{n}" for n in names):
        raise UnsafeCheckpointError(
            f"{path} is a TorchScript archive, which holds code; nothing was executed. "
            "aockpt only reads torch.save state dicts: export model.state_dict() with torch.save"
        )
    dup = sorted(n for n, count in collections.Counter(names).items() if count > 1)
    if dup:
        raise CorruptCheckpointError(f"{path} has duplicate zip members {dup[:4]}; the file was tampered with")
    roots = {n.split("/", 1)[0] for n in names}
    bad = [n for n in names if not _ZIP_MEMBERS.fullmatch(n.split("/", 1)[-1]) or "/" not in n]
    if bad or len(roots) != 1 or not any(n.endswith("/data.pkl") for n in names):
        raise CorruptCheckpointError(
            f"{path} is not a torch.save zip: members must be <folder>/data.pkl and torch's own records "
            f"under one folder; got roots {sorted(roots)[:4]}, unexpected {bad[:4]}"
        )


def _check_stored(path: Path, members: list[zipfile.ZipInfo]) -> None:
    """Every member must be stored uncompressed, as torch.save writes it.

    torch maps a zip member's bytes in place (aockpt loads with ``mmap=True``), so a deflated member
    would be read as its compressed stream: wrong bytes that would then be packed with matching digests.
    A compressed member is also how a small file claims gigabytes (a zip bomb).
    """
    packed = [m.filename for m in members if m.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise CorruptCheckpointError(
            f"{path}: zip member {packed[0]!r} is compressed ({len(packed)} compressed in all); torch.save stores "
            "members uncompressed and aockpt reads only those. Re-save it with torch.save, or re-zip it "
            "with `zip -0`"
        )


def _check_zip(path: Path) -> None:
    """Check a zip container's members (names, storage method) and every CRC before torch's reader sees it."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
            _check_zip_names(path, [m.filename for m in members])
            _check_stored(path, members)
            broken = zf.testzip()
    except zipfile.BadZipFile as e:
        raise CorruptCheckpointError(f"{path} is a damaged zip: {reason(e)}") from e
    if broken is not None:
        raise CorruptCheckpointError(f"{path}: zip member {broken} fails its CRC check; the file is corrupt")


def _check_container(path: Path) -> None:
    """Refuse tar and TorchScript containers and malformed zips; leave pickle-only files to torch."""
    with open(path, "rb") as f:
        head = f.read(_TAR_MAGIC_OFFSET + len(_TAR_MAGIC))
    if head.startswith(ZIP_MAGIC):
        _check_zip(path)
    elif head[_TAR_MAGIC_OFFSET:] == _TAR_MAGIC:
        raise UnsafeCheckpointError(
            f"{path} is a legacy .tar checkpoint, which torch can only read by running its pickles "
            "unrestricted; nothing was executed. Re-save it with torch.save in an environment you trust"
        )


def _refused_names(message: str, path: Path, is_zip: bool) -> list[str]:
    """The globals a refused file names, from torch's static scan where it works, else its message."""
    if is_zip:
        with contextlib.suppress(Exception):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            if names:
                return sorted(names)
    return [m.group(1).strip() for p in _REFUSAL_PATTERNS for m in p.finditer(message)][:1]


def _translate(e: Exception, path: Path, is_zip: bool) -> AockptError:
    """Turn anything torch.load raised into one AockptError line that says what and why."""
    message = str(e)
    if isinstance(e, pickle.UnpicklingError):
        names = _refused_names(message, path, is_zip)
        if names:
            return UnsafeCheckpointError(
                f"{path} was refused: it uses {', '.join(repr(n) for n in names)}, outside aockpt's allowlist; nothing "
                "from the file was executed. Re-export it in an environment you trust, or ask for safetensors"
            )
        op = _OPCODE_PATTERN.search(message)
        if op and int(op.group(1)) < 256:
            name = pickletools.code2op.get(chr(int(op.group(1))))
            name = name.name if name else f"0x{int(op.group(1)):02x}"
            cls = UnsafeCheckpointError if name in _CODE_OPCODES else CorruptCheckpointError
            return cls(
                f"{path} uses pickle opcode {name}, which aockpt's safe loader does not run; nothing from the "
                "file was executed. Re-save it with torch.save (pickle protocol 2)"
            )
    detail = reason(message.split("WeightsUnpickler error:")[-1], 300) or type(e).__name__
    return CorruptCheckpointError(
        f"{path} could not be read as a torch checkpoint ({type(e).__name__}: {detail}); "
        "it is truncated, corrupt, or not written by torch.save"
    )


def _check_tensor(t: torch.Tensor, where: str) -> None:
    """A registry tensor must carry each inner tensor its class needs as a plain tensor."""
    entry = registry.tensor_type_of(t, where)
    required, optional, _ = entry.inner_names()
    state = vars(t)
    for name in required + optional:
        part = state.get(name)
        if (part is None and name in optional) or type(part) in (torch.Tensor, torch.nn.Parameter):
            continue
        raise CorruptCheckpointError(
            f"{where} is a {entry.name} whose part {name!r} is {type(part).__name__}, not a tensor; "
            "the checkpoint is corrupt or crafted"
        )


def _check_value(obj: object, where: str) -> None:
    """An attribute object must hold exactly its own fields, as its constructor would make it."""
    if isinstance(obj, type):
        return
    if dataclasses.is_dataclass(obj):
        fields = {f.name for f in dataclasses.fields(obj)}
        present = {f for f in fields if hasattr(obj, f)}
        extra = set(getattr(obj, "__dict__", {})) - fields
        if present != fields or extra:
            raise CorruptCheckpointError(
                f"{where} is a {type(obj).__name__} with fields {sorted(present | extra)}, expected "
                f"{sorted(fields)}; the checkpoint is corrupt or crafted"
            )
    elif isinstance(obj, tuple) and hasattr(type(obj), "_fields") and len(obj) != len(type(obj)._fields):
        raise CorruptCheckpointError(f"{where} is a {type(obj).__name__} of the wrong length; the checkpoint is corrupt")


def _check_node(obj: object, where: str) -> None:
    """Validate one loaded object by kind: a registry tensor's parts, an attribute object's fields."""
    if type(obj) in (torch.Tensor, torch.nn.Parameter):
        codec.check_storable(obj, where)
    elif isinstance(obj, torch.Tensor):
        _check_tensor(obj, where)
    elif type(obj) not in (dict, list, tuple):
        _check_value(obj, where)


def _children(obj: object, where: str) -> list[tuple[object, str]]:
    """The objects one level inside a loaded object, each with a readable location."""
    if isinstance(obj, dict):
        return [(k, where) for k in obj] + [(v, f"{where}[{reason(repr(k), 60)}]") for k, v in obj.items()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    state = getattr(obj, "__dict__", None)
    if type(state) is dict and not isinstance(obj, type):
        return [(v, f"{where}.{k}") for k, v in state.items()]
    return []


def _check_structure(root: object, path: Path) -> None:
    """Refuse cycles, deep nesting and exponential sharing (memo bombs); validate typed objects."""
    stand_ins = {cls for cls in legacy.STAND_INS.values() if isinstance(cls, type)}  # legacy.migrate checks these
    sizes: dict[int, int] = {}
    open_ids: set[int] = set()
    stack: list[tuple[object, str, int, bool]] = [(root, str(path), 0, False)]
    while stack:
        obj, where, depth, done = stack.pop()
        if not done and type(obj) not in stand_ins:
            _check_node(obj, where)
        kids = [] if type(obj) in (torch.Tensor, torch.nn.Parameter) else _children(obj, where)
        key = id(obj)
        if done:
            open_ids.discard(key)
            sizes[key] = 1 + sum(sizes.get(id(k), 1) for k, _ in kids)
            if sizes[key] > _MAX_NODES:
                raise CorruptCheckpointError(
                    f"{path} expands to more than {_MAX_NODES:,} objects through shared references "
                    "(a memo bomb); refused"
                )
            continue
        if not kids or key in sizes:
            continue
        if key in open_ids:
            raise CorruptCheckpointError(f"{reason(where, 200)} contains itself (a reference cycle); refused")
        if depth >= _MAX_DEPTH:
            raise CorruptCheckpointError(f"{path} nests containers deeper than {_MAX_DEPTH} levels; refused")
        open_ids.add(key)
        stack.append((obj, where, depth, True))
        stack.extend((k, w, depth + 1, False) for k, w in kids)


def safe_load(path: str | os.PathLike, map_location: Any = None, *, mmap: bool = False) -> Any:
    """Load a torch.save file without letting it run code: torch's weights-only unpickler, aockpt's allowlist.

    Args:
        path: a torch.save checkpoint (zip or legacy non-zip container).
        map_location: as for torch.load; defaults to "cpu" on a machine without CUDA, so
            CUDA-tagged checkpoints load anywhere.
        mmap: map a zip-container file's storages instead of reading them (file-backed, loaded on
            first touch); ignored for the legacy container, which torch cannot map.

    Returns:
        The loaded object (usually a state dict).

    Raises:
        UnsafeCheckpointError: the file names a global outside the allowlist, uses a code opcode, or is a
            TorchScript or .tar archive; nothing from it was executed.
        CorruptCheckpointError: missing, a directory, empty, truncated, malformed, or structurally hostile.
        UnsupportedTensorError: it holds a tensor subclass outside aockpt's registry.
    """
    path = Path(path)
    _check_file(path)
    _check_container(path)
    scan_pickle(path)
    if map_location is None and not torch.cuda.is_available():
        map_location = "cpu"
    with open(path, "rb") as f:
        is_zip = f.read(len(ZIP_MAGIC)) == ZIP_MAGIC
        f.seek(0)
        pairs = allowlist()
        with _only_our_globals(pairs):
            try:
                mapped = mmap and is_zip and path.suffix != ".safetensors"
                obj = torch.load(str(path) if mapped else f, map_location=map_location, weights_only=True,
                                 mmap=mapped)
            except Exception as e:  # noqa: BLE001 - every failure of an untrusted file becomes one AockptError
                raise _translate(e, path, is_zip) from e
    _check_structure(obj, path)
    return obj


def storage_devices(path: str | os.PathLike) -> set[str]:
    """Device types the file's storages were saved from, read from the pickle opcodes without running them.

    torch records each storage's location ("cpu", "cuda:0", ...) as a string in the pickle's persistent
    ids; loading maps them to CPU, so this is the only trace of where a checkpoint was made. Returns an
    empty set where the file cannot be scanned.
    """
    try:
        return scan_pickle(Path(path)).locations
    except (AockptError, OSError):
        return set()
