"""Every kind of input aockpt reads, behind one interface: names, types, and flat tensors on demand.

Inputs: aockpt-packed folders, torchao/transformers safetensors folders or files, plain safetensors,
torch pickles (``.pt``/``.bin``, zip or legacy container, sharded ``pytorch_model-*.bin`` with index),
and Hugging Face model folders holding any of these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from . import codec, ct_source, foreign, format as fmt, legacy
from .errors import CorruptCheckpointError, UnsupportedTensorError, UsageError
from .fetch import release_mapped
from .filenames import PICKLE_INDEX, PICKLE_SUFFIXES, PICKLE_WEIGHTS
from .hf_config import folder_skeleton, tied_partner
from .paths import member
from .portability import TensorKind, settle_packers
from .reader import Checkpoint, Flavor, open_checkpoint, read_flat
from .registry import tensor_type_named, tensor_type_of
from .remote_sources import open_remote
from .unpickle import safe_load, storage_devices



@dataclass
class Source:
    """An opened input: its tensor names, what each is, aliases, and a way to get each flat tensor.

    A context manager: ``with open_source(path) as source:`` releases its files on the way out.
    """

    path: Path
    kind: str
    types: dict[str, TensorKind]
    aliases: dict[str, str]
    made_on: dict[str, str]
    flat: Callable[[str], codec.FlatTensor]  # a tensor's parts (views where the source allows) and attributes
    digests: Callable[[str], list[tuple[str, str, memoryview]]] | None = None
    origins: dict[str, str] = field(default_factory=dict)  # what a migrated tensor was, for inspect
    extra_files: list[Path] = field(default_factory=list)
    checkpoint: Checkpoint | None = None
    foreign: foreign.Foreign | None = None  # what another library quantized (only `inspect` opens one)
    shape_only: Callable[[str], codec.FlatTensor] | None = None  # `describe` without touching the input
    release: Callable[[], None] | None = None  # closes what a source kind holds besides `checkpoint`

    def describe(self, name: str) -> codec.FlatTensor:
        """A tensor's record with shape-only (meta) parts: what the plan stage checks, reading no tensor byte."""
        return self.shape_only(name) if self.shape_only is not None else _shape_only(self.flat(name))

    def close(self) -> None:
        """Release files held open."""
        if self.checkpoint is not None:
            self.checkpoint.close()
        if self.release is not None:
            self.release()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def real_names(self, names: Iterable[str]) -> list[str]:
        """The stored tensors behind `names` (aliases resolved), each once, in order."""
        return list(dict.fromkeys(self.aliases.get(n, n) for n in names))

    @property
    def names(self) -> list[str]:
        """Every tensor name: stored ones, then aliases."""
        return [*self.types, *self.aliases]


def from_checkpoint(ckpt: Checkpoint, kind: str) -> Source:
    """A safetensors checkpoint as a source: nothing is read until a tensor is asked for."""
    types, aliases, made_on = {}, {}, {}
    for name, entry in ckpt.entries.items():
        if entry.alias_of is not None:
            aliases[name] = entry.alias_of
            continue
        types[name] = TensorKind(tensor_type_named(entry.type, f"{ckpt.path}: {name}"), entry.packer)
        made_on[name] = entry.device

    def digests(name: str) -> list[tuple[str, str, memoryview]]:
        entry = ckpt.entries[name]
        return [(inner, p.digest, ckpt.raw(p.key)) for inner, p in entry.parts.items()]

    return Source(ckpt.path, kind, types, aliases, made_on, lambda n: read_flat(ckpt, n),
                  digests if ckpt.flavor is Flavor.PACKED else None, checkpoint=ckpt,
                  shape_only=lambda n: read_flat(ckpt, n, ckpt.shape_only))


def from_state_dict(state_dict: dict[str, Any], path: Path, kind: str, made_on: str = "unknown") -> Source:
    """An in-memory state dict as a source; legacy records are migrated to current torchao tensors first."""
    tensors = _current_tensors(state_dict, path)
    origins = {n: legacy.describe(v, n) for n, v in state_dict.items() if legacy.is_legacy(v)}
    if origins:
        kind = f"{kind}, written by torchao <= 0.17 (legacy records migrated on read)"
    aliases = codec.aliases(list(tensors.items()))
    types = {}
    for name, tensor in tensors.items():
        if name not in aliases:
            row = tensor_type_of(tensor, name)
            types[name] = TensorKind(row, row.assumed_packer)
    made_on = dict.fromkeys(types, made_on)
    return Source(path, kind, types, aliases, made_on, lambda n: codec.flatten(n, tensors[n]), origins=origins)


def _shape_only(flat: codec.FlatTensor) -> codec.FlatTensor:
    """A flat tensor whose parts are meta tensors of the same shapes and dtypes."""
    parts = {k: torch.empty(p.shape, dtype=p.dtype, device="meta") for k, p in flat.parts.items()}
    return codec.FlatTensor(flat.row, flat.shape, flat.dtype, parts, flat.attrs)


def _current_tensors(state_dict: Any, path: Path) -> dict[str, torch.Tensor]:
    """Check a loaded pickle is a flat state dict; migrate legacy torchao records it holds."""
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) for k in state_dict):
        raise UnsupportedTensorError(
            f"{path} holds a {type(state_dict).__name__}, not a state dict of named tensors; "
            "save model.state_dict() instead"
        )
    out = {}
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and not legacy.is_legacy(value):
            if not codec.tensor_type_of(value, name).quantized:
                codec.check_storable(value, name)
            out[name] = value
        else:
            out[name] = _migrate(name, value, path)
    return out


def _migrate(name: str, value: Any, path: Path) -> torch.Tensor:
    """Turn one legacy record into the current torchao tensor computing the same thing."""
    if not legacy.is_legacy(value):
        raise UnsupportedTensorError(f"{path}: {name} is a {type(value).__name__}, not a tensor aockpt can read")
    return legacy.migrate(name, value)


def _load_pickle(path: Path) -> dict[str, Any]:
    """Unpickle with aockpt's exact allowlist; nothing from the file runs."""
    return safe_load(path, map_location="cpu", mmap=True)


def _made_on(files: list[Path]) -> str:
    """The one device type the files' storages were saved from, "unknown" when none or several."""
    devices = set().union(*(storage_devices(f) for f in files))
    return devices.pop() if len(devices) == 1 else "unknown"


def _pickle_folder(path: Path) -> Source:
    """A transformers folder of pytorch_model.bin or its shards."""
    index = path / PICKLE_INDEX
    if index.is_file():
        weight_map = fmt.read_index(member(path, PICKLE_INDEX))
        files = sorted(set(weight_map.values()))
    else:
        files = [PICKLE_WEIGHTS]
    state: dict[str, Any] = {}
    shards = [member(path, name) for name in files]
    for shard in shards:
        for key, value in _load_pickle(shard).items():
            if key in state:
                raise CorruptCheckpointError(f"{path}: tensor {key!r} appears in two shards")
            state[key] = value
    return from_state_dict(state, path, "transformers folder (pytorch_model.bin)", _made_on(shards))


def _safetensors_source(path: Path) -> Source:
    """A packed, torchao or plain safetensors file or folder."""
    return _checkpoint_source(open_checkpoint(path, omitted_ok=True))


def _checkpoint_source(ckpt: Checkpoint) -> Source:
    """An opened safetensors checkpoint as a source, named for the writer that made it."""
    kind = f"aockpt packed checkpoint {ckpt.format_version}" if ckpt.flavor is Flavor.PACKED else ckpt.flavor.value
    return from_checkpoint(ckpt, kind)


def _remote(ckpt: Checkpoint) -> Source:
    """A remote checkpoint (aockpt.remote_sources): shards read by range, its small files staged in a folder."""
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    source = _checkpoint_source(ckpt)
    if ckpt.path.is_dir():
        source.extra_files = [member(folder, p.name) for p in sorted(folder.iterdir())
                              if p.is_file() and not p.name.startswith(".") and not _is_weight_file(p)]
    _restore_ties(source, folder)
    return source


def _is_weight_file(p: Path) -> bool:
    """Files that a pack rewrites rather than copies."""
    return p.suffix == ".safetensors" or p.name in (fmt.INDEX_NAME, PICKLE_INDEX) or p.suffix in PICKLE_SUFFIXES


def open_source(path: str | Path, cpu_packer: str | None = None, *, foreign_ok: bool = False,
                partial: bool = False) -> Source:
    """Open any supported input by what it is on disk, never by trusting its contents.

    `path` may also name a Hub repo or an object-store URL (aockpt.locations); `partial` says only some of
    its bytes will be read. `cpu_packer` names the packer of CPU int4 tensors whose file does not record
    one (see `settle_packers`). A checkpoint quantized by another library is refused
    (ForeignCheckpointError) unless `foreign_ok`.
    """
    opened = open_remote(path, partial=partial)
    source = _open(opened) if isinstance(opened, Path) else _remote(opened)
    try:
        source.foreign = foreign.checked(source, refuse=not foreign_ok)
        source.types = settle_packers(source.types, lambda name: _rows(source.describe(name)), cpu_packer,
                                      str(source.path))
    except BaseException:
        source.close()
        raise
    return source


def _rows(flat: codec.FlatTensor) -> int | None:
    """N of an int4 weight [N, K], from its attributes where a foreign file declares no outer shape."""
    shape = flat.shape or flat.attrs.get("shape")
    return shape[0] if shape and isinstance(shape[0], int) else None


def _open(path: Path) -> Source:
    """The source for a path, by what it is on disk."""
    if not path.exists():
        raise UsageError(f"{path} does not exist; pass a checkpoint file or folder")
    if path.is_file():
        if path.suffix == ".safetensors":
            source = _safetensors_source(path)
            _restore_ties(source, path.parent)
            return source
        return from_state_dict(_load_pickle(path), path, "torch pickle", _made_on([path]))
    if (path / fmt.INDEX_NAME).is_file() or (path / fmt.WEIGHTS_NAME).is_file():
        opener = _safetensors_source
    elif (path / PICKLE_INDEX).is_file() or (path / PICKLE_WEIGHTS).is_file():
        opener = _pickle_folder
    else:
        raise CorruptCheckpointError(
            f"{path} has no weights: expected {fmt.WEIGHTS_NAME}, {fmt.INDEX_NAME}, {PICKLE_WEIGHTS} or {PICKLE_INDEX}"
        )
    if ct_source.imports_folder(path):
        opener = _compressed_tensors_folder
    others = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    extra_files = [member(path, p.name) for p in others if not _is_weight_file(p)]
    source = opener(path)
    source.extra_files = extra_files
    _restore_ties(source, path)
    return source


def _compressed_tensors_folder(path: Path) -> Source:
    """A compressed-tensors folder aockpt imports (ct_source): its weights as the matching torchao tensors."""
    folder = ct_source.open_folder(path)
    return Source(path, folder.kind, folder.types, {}, dict.fromkeys(folder.types, "unknown"), folder.flat,
                  release=folder.release)


def _restore_ties(source: Source, folder: Path) -> None:
    """Alias each tensor the writer omitted to the stored one the model ties it to; refuse any other gap."""
    omitted = source.checkpoint.omitted if source.checkpoint is not None else []
    if not omitted:
        return
    skel = folder_skeleton(source)
    for name in omitted:
        partner = tied_partner(name, skel)
        if partner is None or (partner not in source.types and partner not in source.aliases):
            source.close()
            raise CorruptCheckpointError(
                f"{folder}: {name} is listed but none of its data is stored, and config.json does not tie it "
                "to a stored tensor; the checkpoint is incomplete: re-download or re-save it"
            )
        source.aliases[name] = source.aliases.get(partner, partner)


def merge_stored_ties(source: Source) -> None:
    """Store once what the model ties but the input stored twice with identical bytes (torchao 0.14 folders
    do): the tie is kept, and the copy's bytes are not written again. Anything less than equal stays apart."""
    skel = folder_skeleton(source)
    for tied, target in (skel.ties.items() if skel else ()):
        if tied not in source.types or target not in source.types:
            continue
        a, b = source.flat(tied), source.flat(target)
        same = _same_stored(a, b)
        release_mapped([*a.parts.values(), *b.parts.values()])
        if same:
            del source.types[tied]
            source.aliases.update({n: target for n, t in source.aliases.items() if t == tied})
            source.aliases[tied] = target


def _same_stored(a: codec.FlatTensor, b: codec.FlatTensor) -> bool:
    """Same type, outer shape and dtype, attributes, and every part byte for byte."""
    if (a.row, a.shape, a.dtype, a.attrs, list(a.parts)) != (b.row, b.shape, b.dtype, b.attrs, list(b.parts)):
        return False
    return all(p.dtype == b.parts[k].dtype and p.shape == b.parts[k].shape and
               torch.equal(p.reshape(-1).view(torch.uint8), b.parts[k].reshape(-1).view(torch.uint8))
               for k, p in a.parts.items())
