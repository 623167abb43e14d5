"""Tensor-parallel slices read straight from disk: each rank loads only its rows or columns of every weight.

A plan maps module-name patterns to a split in the vocabulary of torch's tensor parallelism
(``ColwiseParallel`` / ``RowwiseParallel`` or the strings "colwise" / "rowwise", plus "vocab" for an
embedding split over its vocabulary and "replicate"). For each tensor, the registry says how its parts
follow the outer rows and columns (``TensorType.tp`` / ``tp_axes``), so a rank reads only its slice of
``qdata`` and the matching scales. Slices follow torch's ``Shard`` chunking, so they wrap into
``DTensor.from_local`` unchanged. See docs/distributed.md.
"""

from __future__ import annotations

import enum
import fnmatch
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import codec, portability, relayout
from .errors import KeyMismatchError, PortabilityError, UnsupportedTensorError, UsageError
from .filenames import PICKLE_INDEX, PICKLE_SUFFIXES, PICKLE_WEIGHTS
from .reader import Checkpoint, open_checkpoint, read_flat
from .registry import Along, TensorType, TpSplit, tensor_type_named


class Style(str, enum.Enum):
    """How one module's weight is split across ranks."""

    COLWISE = "colwise"  # output features: weight rows (torch ColwiseParallel on nn.Linear), bias too
    ROWWISE = "rowwise"  # input features: weight columns (torch RowwiseParallel on nn.Linear), bias replicated
    VOCAB = "vocab"  # an embedding's rows (torch RowwiseParallel on nn.Embedding)
    REPLICATE = "replicate"  # every rank loads the whole tensor


# style -> parameter name -> outer dim it is split along (absent: replicated)
_SPLIT_DIMS: dict[Style, dict[str, int]] = {
    Style.COLWISE: {"weight": 0, "bias": 0},
    Style.ROWWISE: {"weight": 1},
    Style.VOCAB: {"weight": 0},
    Style.REPLICATE: {},
}
_TORCH_STYLES = {"ColwiseParallel": Style.COLWISE, "RowwiseParallel": Style.ROWWISE}


@dataclass(frozen=True)
class TPShard:
    """One rank's place in a tensor-parallel group, and the plan it loads with."""

    plan: Mapping[str, Any]  # module-name pattern -> Style, its string, or a torch ParallelStyle
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if not (isinstance(self.world_size, int) and self.world_size > 0 and 0 <= self.rank < self.world_size):
            raise UsageError(f"tensor-parallel rank {self.rank} / world size {self.world_size} is not valid; "
                             "need 0 <= rank < world_size")
        for pattern, value in self.plan.items():
            style_of(value, pattern)


def style_of(value: Any, pattern: str) -> Style:
    """A plan value as a Style: a Style, its string, or torch's ColwiseParallel / RowwiseParallel object."""
    if isinstance(value, str):
        try:
            return Style(value)
        except ValueError:
            pass
    else:
        for klass in type(value).__mro__:
            if klass.__module__.startswith("torch.distributed") and klass.__name__ in _TORCH_STYLES:
                return _TORCH_STYLES[klass.__name__]
    raise UsageError(f"tensor-parallel plan entry {pattern!r} has style {value!r}; use one of "
                     f"{', '.join(s.value for s in Style)} or torch's ColwiseParallel / RowwiseParallel")


def _matches(pattern: str, module: str) -> bool:
    """torch's rule: the pattern and the module name match atom by atom (``*`` within one atom)."""
    atoms, names = pattern.split("."), module.split(".")
    return len(atoms) == len(names) and all(fnmatch.fnmatchcase(n, a) for a, n in zip(atoms, names))


def split_dim(name: str, plan: Mapping[str, Any]) -> int | None:
    """The outer dim a parameter is split along under `plan`, None when it is replicated."""
    module, _, param = name.rpartition(".")
    styles = {style_of(v, p) for p, v in plan.items() if _matches(p, module)}
    if len(styles) > 1:
        found = ", ".join(sorted(s.value for s in styles))
        raise UsageError(f"{name} matches plan patterns with different styles ({found}); make the patterns disjoint")
    return _SPLIT_DIMS[styles.pop()].get(param) if styles else None


def chunk(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank's [start, stop) of a dimension, as torch's Shard placement chunks it (ceil-sized, last ones short)."""
    full = -(-size // world_size)
    start = min(rank * full, size)
    return start, min(start + full, size)


@dataclass(frozen=True)
class SliceInfo:
    """Where a rank's local tensor sits in the full one, for writers that reassemble it (aockpt.dcp)."""

    full_shape: tuple[int, ...]
    full_attrs: dict[str, Any]
    parts: dict[str, tuple[int, int, int] | None] | None  # part -> (dim, start, full length); None: replicated
    # parts is None for re-laid-out int4, whose local parts are not pieces of the stored ones


_SLICES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def slice_info(tensor: torch.Tensor) -> SliceInfo | None:
    """How a tensor returned by load_shard was cut, None for a whole tensor or one aockpt did not slice."""
    return _SLICES.get(tensor)


@dataclass(frozen=True)
class _Cut:
    """One tensor's cut: the outer dim, its full size and the rank's [start, stop)."""

    name: str
    dim: int
    size: int
    start: int
    stop: int
    style: str


def load_shard(path: str | os.PathLike, device: str | torch.device = "cpu", *, shard: TPShard,
               keys: Iterable[str] | Callable[[str], bool] | None = None,
               relayout: bool = False) -> dict[str, torch.Tensor]:
    """Each name's local tensor for `shard.rank`, reading only the bytes of that rank's slice.

    The device rules of load_quantized apply: a slice of device-packed int4 that cannot live on `device`
    is refused, or with `relayout` re-packed exactly for it.

    Args:
        path: a safetensors checkpoint (aockpt-packed, torchao/transformers-written, or plain).
        device: where the local tensors go.
        shard: plan, rank and world size.
        keys: names to load, or a predicate on names (default: all).
        relayout: re-pack device-pinned int4 slices exactly for `device` instead of refusing them.
    Returns:
        name -> local tensor (torchao subclass for quantized weights); replicated names hold the whole tensor.
    Raises:
        UsageError (bad plan, or a pickle input), UnsupportedTensorError (a type or layout that cannot be
        split that way; the message names the tensor), PortabilityError, CorruptCheckpointError.
    """
    ckpt = open_sliceable(path)
    try:
        return {name: p.tensor for name, p in _read_pieces(ckpt, shard, device, keys, relayout).items()}
    finally:
        ckpt.close()


def open_sliceable(path: str | os.PathLike) -> Checkpoint:
    """Open a safetensors checkpoint for slicing; pickles are refused with the command that converts them."""
    p = Path(path)
    if p.suffix in PICKLE_SUFFIXES or (p / PICKLE_WEIGHTS).is_file() or (p / PICKLE_INDEX).is_file():
        raise UsageError(f"{path} is a torch pickle, whose tensors cannot be read in slices; "
                         f"convert it once with `aockpt pack {path} packed/` and load the packed folder")
    return open_checkpoint(p)


def read_shard(ckpt: Checkpoint, shard: TPShard, device: str | torch.device = "cpu", *,
               keys: Iterable[str] | Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The slices exactly as stored, on `device` without load_quantized's device rules, from an open
    checkpoint whose shards count the bytes read (see bytes_read): for tools and tests."""
    return {name: piece.tensor for name, piece in _read_pieces(ckpt, shard, device, keys, None).items()}


@dataclass(frozen=True)
class _Piece:
    """A rank's local tensor, the outer dim it was split along (None: whole) and the full outer shape."""

    tensor: torch.Tensor
    dim: int | None
    full_shape: tuple[int, ...]


def _read_pieces(ckpt: Checkpoint, shard: TPShard, device: str | torch.device, keys: Any,
                 relayout: bool | None) -> dict[str, _Piece]:
    """Every requested name's piece; tied names split the same way share one tensor.

    `relayout` None leaves slices as stored; False / True apply load_quantized's device rules.
    """
    target = portability.parse_device(device)
    names = [n for n in ckpt.entries if keys(n)] if callable(keys) else list(ckpt.entries if keys is None else keys)
    missing = sorted(set(names) - set(ckpt.entries))
    if missing:
        raise KeyMismatchError(f"{ckpt.path} has no tensor named {', '.join(missing[:10])}")
    built: dict[tuple[str, int | None], _Piece] = {}
    out = {}
    for name in names:
        real = ckpt.resolve(name)
        dim = split_dim(name, shard.plan)
        if (real, dim) not in built:
            built[(real, dim)] = _load_one(ckpt, real, dim, shard, target, relayout)
        out[name] = built[(real, dim)]
    return out


def load_dtensors(path: str | os.PathLike, mesh: Any, plan: Mapping[str, Any], *,
                  keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """This rank's slices wrapped as DTensors on a 1-D device mesh with the plan's placements.

    torchao 0.18 lets Float8Tensor and NVFP4Tensor live inside a DTensor; Int8Tensor, IntxUnpackedToInt8Tensor
    and the int4 types do not (``aten.view`` is not implemented): those are refused by name, and
    load_shard gives the same slices as plain local tensors (docs/distributed.md).
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    shard = TPShard(plan, mesh.get_local_rank(), mesh.size())
    device = torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device()) \
        if mesh.device_type != "cpu" else torch.device("cpu")
    ckpt = open_sliceable(path)
    try:
        pieces = _read_pieces(ckpt, shard, device, keys, False)
    finally:
        ckpt.close()
    out = {}
    for name, piece in pieces.items():
        placement = Replicate() if piece.dim is None else Shard(piece.dim)
        stride = torch.empty(piece.full_shape, device="meta").stride()
        try:
            out[name] = DTensor.from_local(piece.tensor, mesh, [placement], run_check=False,
                                           shape=torch.Size(piece.full_shape), stride=stride)
        except NotImplementedError as e:
            op = re.search(r"op='([^']+)'", str(e))
            raise UnsupportedTensorError(
                f"{name}: torchao's {type(piece.tensor).__name__} cannot be wrapped in a DTensor (torchao does not "
                f"implement {op.group(1) if op else 'an op DTensor needs'} for it); use aockpt.tp.load_shard for "
                "plain local tensors") from e
    return out


def bytes_read(ckpt: Checkpoint) -> int:
    """Bytes every shard of an open checkpoint has read through read_slice."""
    return sum(s.bytes_read for s in ckpt.shards.values())


def _load_one(ckpt: Checkpoint, name: str, dim: int | None, shard: TPShard, device: torch.device,
              relayout: bool | None) -> _Piece:
    """One tensor's local slice (or the whole tensor when `dim` is None), rebuilt on `device`."""
    flat = read_flat(ckpt, name, device)
    where = f"{ckpt.path}: {name}"
    codec.check_record(flat, where)  # the whole record is sound before any slicer or converter reads it
    if flat.shape is None:  # a foreign record: learn the outer shape from the tensor built on the mapped views
        full = codec.rebuild(flat, where)
        flat = codec.FlatTensor(flat.type_name, tuple(full.shape), full.dtype, flat.parts, flat.attrs)
    if dim is not None and len(flat.shape) <= dim:
        dim = None
    packer = ckpt.entries[name].packer
    if dim is None:
        parts = {inner: _read(ckpt, ckpt.entries[name].parts[inner].key) for inner in flat.parts}
        whole = codec.FlatTensor(flat.type_name, flat.shape, flat.dtype, parts, flat.attrs)
        whole, _ = _fit(whole, packer, name, device, relayout)
        return _Piece(codec.rebuild(whole, where, device), None, flat.shape)
    size = flat.shape[dim]
    start, stop = chunk(size, shard.rank, shard.world_size)
    cut = _Cut(name, dim, size, start, stop, ("colwise/vocab", "rowwise")[dim])
    entry = tensor_type_named(flat.type_name, where)
    local, spans, packer = _SLICERS[entry.tp[dim]](ckpt, flat, entry, cut, device, packer)
    local, converted = _fit(local, packer, name, device, relayout)
    tensor = codec.rebuild(local, f"{where} (rank {shard.rank} of {shard.world_size})", device)
    spans = None if converted else spans
    _SLICES[tensor] = SliceInfo(flat.shape, flat.attrs, spans)
    return _Piece(tensor, dim, flat.shape)


def _fit(flat: codec.FlatTensor, packer: str | None, name: str, device: torch.device,
         relayout: bool | None) -> tuple[codec.FlatTensor, bool]:
    """load_quantized's device rules on one (local) tensor: refuse it, or re-pack it exactly; whether it was."""
    if relayout is None:
        return flat, False
    kind = portability.TensorKind(flat.type_name, packer)
    converters = portability.plan_loading({name: kind}, device, relayout=relayout)
    if name not in converters:
        return flat, False
    return converters[name](flat, device)[0], True


def _read(ckpt: Checkpoint, key: str, dim: int = 0, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Indices start:stop of a stored part along `dim`, read from its shard file."""
    return ckpt.shards[ckpt.key_to_shard[key]].read_slice(key, dim, start, stop)


def _blocks(flat: codec.FlatTensor) -> list[int]:
    """Quantization block size along each outer dim (an int block_size runs along the last dim)."""
    block = flat.attrs.get("block_size")
    if isinstance(block, int):
        return [1] * (len(flat.shape) - 1) + [block]
    if block is None:
        return list(flat.shape)
    return list(block)


def _refuse(cut: _Cut, flat: codec.FlatTensor, why: str, fix: str) -> UnsupportedTensorError:
    """The one-line error for a slice that cannot be cut exactly."""
    return UnsupportedTensorError(f"{cut.name}: a {cut.style} split of this {flat.type_name} {list(flat.shape)} "
                                  f"({cut.start}:{cut.stop} of dim {cut.dim}) {why}; {fix}")


def _slice_direct(ckpt: Checkpoint, flat: codec.FlatTensor, entry: TensorType, cut: _Cut,
                  device: torch.device, packer: str | None) -> tuple[codec.FlatTensor, dict, str | None]:
    """Read only the slice's rows/columns of each part (registry tp_axes), group-aligned."""
    block = _blocks(flat)[cut.dim]
    whole_block = block >= cut.size
    if not whole_block and (cut.start % block or (cut.stop % block and cut.stop != cut.size)):
        raise _refuse(cut, flat, f"would cut a quantization group of {block}",
                      f"use a world size that divides its {-(-cut.size // block)} groups, or re-quantize with a "
                      f"group size that divides {cut.stop - cut.start}")
    axes = {part: axes[cut.dim] for part, *axes in entry.tp_axes}
    parts, spans = {}, {}
    for inner, stored in flat.parts.items():
        key = ckpt.entries[cut.name].parts[inner].key
        axis = axes.get(inner)
        if axis is None:
            if stored.numel() > 1:
                raise _refuse(cut, flat, f"has a part {inner!r} that the registry does not say how to split",
                              "load it whole (no plan entry) or re-quantize without that option")
            parts[inner], spans[inner] = _read(ckpt, key), None
            continue
        pdim, along = axis
        span = _part_span(cut, flat, inner, stored.shape[pdim], along, block, whole_block)
        parts[inner] = _read(ckpt, key, pdim, *span)
        spans[inner] = (pdim, span[0], stored.shape[pdim]) if span != (0, stored.shape[pdim]) else None
    local = codec.FlatTensor(flat.type_name, _local_shape(flat, cut), flat.dtype, parts,
                             _local_attrs(flat, cut, whole_block))
    return local, spans, packer


def _part_span(cut: _Cut, flat: codec.FlatTensor, inner: str, stored: int, along: Along, block: int,
               whole_block: bool) -> tuple[int, int]:
    """[start, stop) along a part's dim that holds the rank's slice."""
    if along is Along.BLOCKS:
        if stored != -(-cut.size // block):
            raise _refuse(cut, flat, f"keeps {stored} {inner} blocks where {-(-cut.size // block)} were expected "
                          "(padded or swizzled layout)", "save it with unswizzled scales or load it whole")
        return (0, stored) if whole_block else (cut.start // block, -(-cut.stop // block))
    ratio = cut.size // stored if stored else 1
    if stored * ratio != cut.size or cut.start % ratio or (cut.stop % ratio and cut.stop != cut.size):
        raise _refuse(cut, flat, f"would split a stored {inner} element holding {ratio} values",
                      "use a world size giving even slice sizes")
    return cut.start // ratio, -(-cut.stop // ratio)


def _local_shape(flat: codec.FlatTensor, cut: _Cut) -> tuple[int, ...]:
    """The outer shape of the rank's slice."""
    shape = list(flat.shape)
    shape[cut.dim] = cut.stop - cut.start
    return tuple(shape)


def _local_attrs(flat: codec.FlatTensor, cut: _Cut, whole_block: bool) -> dict[str, Any]:
    """Attributes that describe sizes (block_size spanning the cut dim, shape) rewritten for the slice."""
    attrs = dict(flat.attrs)
    block = attrs.get("block_size")
    if whole_block and isinstance(block, (list, tuple)):
        resized = list(block)
        resized[cut.dim] = cut.stop - cut.start
        attrs["block_size"] = type(block)(resized)
    if "shape" in attrs:
        attrs["shape"] = type(attrs["shape"])(_local_shape(flat, cut))
    return attrs


def _slice_relayout(ckpt: Checkpoint, flat: codec.FlatTensor, entry: TensorType, cut: _Cut,
                    device: torch.device, packer: str | None) -> tuple[codec.FlatTensor, None, str]:
    """Device-packed int4: read it whole, cut its exact canonical form, re-pack the slice for `device`."""
    parts = {inner: _read(ckpt, ckpt.entries[cut.name].parts[inner].key) for inner in flat.parts}
    canon = relayout.to_canonical(flat.type_name, parts, flat.attrs, packer=packer)
    g = canon.group_size
    if cut.dim == 1 and (cut.start % g or (cut.stop % g and cut.stop != cut.size)):
        raise _refuse(cut, flat, f"would cut a quantization group of {g}",
                      f"use a world size that divides its {canon.n_groups} groups")
    if cut.dim == 0:
        values, sz = canon.values[cut.start:cut.stop], canon.scale_and_zero[:, cut.start:cut.stop]
    else:
        values, sz = canon.values[:, cut.start:cut.stop], canon.scale_and_zero[cut.start // g:-(-cut.stop // g)]
    local = relayout.Int4Canonical(values.contiguous(), sz.contiguous(), g, (values.shape[0], values.shape[1]),
                                   canon.dtype)
    try:
        new_parts, attrs, new_packer = relayout.from_canonical(local, flat.type_name, device)
    except PortabilityError as e:
        raise _refuse(cut, flat, f"cannot be re-packed on {device.type} ({e})",
                      f"load it on a {entry.packed_for.value} device") from e
    return codec.FlatTensor(flat.type_name, _local_shape(flat, cut), flat.dtype, new_parts, attrs), None, new_packer


def _slice_none(ckpt: Checkpoint, flat: codec.FlatTensor, entry: TensorType, cut: _Cut,
                device: torch.device, packer: str | None) -> tuple[codec.FlatTensor, None, None]:
    """Refuse: this layout keeps no row/column structure aockpt can cut exactly."""
    raise _refuse(cut, flat, f"is not supported ({entry.note}: the layout cannot be cut exactly)",
                  "leave it out of the plan to load it whole on every rank")


_SLICERS = {TpSplit.DIRECT: _slice_direct, TpSplit.RELAYOUT: _slice_relayout, TpSplit.NONE: _slice_none}


def shard_bytes(ckpt: Checkpoint) -> int:
    """Stored bytes of every part (the denominator of a rank's read fraction)."""
    return sum(math.prod(s.shape) * s.dtype.itemsize for f in ckpt.shards.values() for s in f.slots.values())
