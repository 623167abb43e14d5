"""How a cut of a tensor's outer shape (rows or columns, [start, stop)) maps onto each stored part.

Part of the plan stage: for a DIRECT row of the registry, ``part_spans`` says which [start, stop) of
which dim of each part holds the slice (``TensorType.tp_axes``), group-aligned, and ``local_record``
the slice's outer shape and size attributes; nothing is read here. For device-packed int4 (RELAYOUT),
``cut_canonical`` cuts the exact canonical form of the whole tensor at build time. Every refusal names
the tensor, the cut and the remedy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import codec, relayout
from .errors import PortabilityError, UnsupportedTensorError
from .registry import Along

Span = tuple[int, int, int]  # (part dim, start, stop)


@dataclass(frozen=True)
class Cut:
    """A slice of one outer dim: [start, stop) of `size`, as one rank of `world` holds it."""

    dim: int
    start: int
    stop: int
    size: int
    style: str = "split"  # how errors name it: colwise/vocab, rowwise


def _blocks(flat: codec.FlatTensor) -> list[int]:
    """Quantization block size along each outer dim (an int block_size runs along the last dim)."""
    block = flat.attrs.get("block_size")
    if isinstance(block, int):
        return [1] * (len(flat.shape) - 1) + [block]
    if block is None:
        return list(flat.shape)
    return list(block)


def refusal(name: str, cut: Cut, flat: codec.FlatTensor, why: str, fix: str) -> UnsupportedTensorError:
    """The one-line error for a slice that cannot be cut exactly."""
    return UnsupportedTensorError(f"{name}: a {cut.style} split of this {flat.row.name} {list(flat.shape)} "
                                  f"({cut.start}:{cut.stop} of dim {cut.dim}) {why}; {fix}")


def part_spans(name: str, flat: codec.FlatTensor, cut: Cut) -> dict[str, Span | None]:
    """Each part's span holding the slice (None: the part is read whole), for a record already checked whole."""
    block = _blocks(flat)[cut.dim]
    if not isinstance(block, int) or block < 0 or (block == 0 and cut.size):
        raise refusal(name, cut, flat, f"has a block size of {block!r} along that dim",
                      "leave it out of the plan to load it whole on every rank")
    whole_block = block >= cut.size
    if not whole_block and (cut.start % block or (cut.stop % block and cut.stop != cut.size)):
        raise refusal(name, cut, flat, f"would cut a quantization group of {block}",
                      f"use a world size that divides its {-(-cut.size // block)} groups, or re-quantize with a "
                      f"group size that divides {cut.stop - cut.start}")
    axes = {part: axes[cut.dim] for part, *axes in flat.row.tp_axes}
    spans: dict[str, Span | None] = {}
    for inner, stored in flat.parts.items():
        axis = axes.get(inner)
        if axis is None:
            if stored.numel() > 1:
                raise refusal(name, cut, flat, f"has a part {inner!r} that the registry does not say how to split",
                              "load it whole (no plan entry) or re-quantize without that option")
            spans[inner] = None
            continue
        pdim, along = axis
        if along is Along.BLOCKS and whole_block:  # one block spans the dim: every rank needs all of it
            spans[inner] = None
            continue
        if pdim >= stored.dim():
            raise refusal(name, cut, flat, f"has a {stored.dim()}-d part {inner!r} with no dim {pdim} to split",
                          "load it whole (no plan entry)")
        start, stop = _span(name, cut, flat, inner, stored.shape[pdim], along, block)
        spans[inner] = None if (start, stop) == (0, stored.shape[pdim]) else (pdim, start, stop)
    return spans


def _span(name: str, cut: Cut, flat: codec.FlatTensor, inner: str, stored: int, along: Along,
          block: int) -> tuple[int, int]:
    """[start, stop) along a part's dim that holds the slice (its length was checked against the shape)."""
    if along is Along.BLOCKS:
        if stored != -(-cut.size // block):
            raise refusal(name, cut, flat, f"keeps {stored} {inner} blocks where {-(-cut.size // block)} are "
                          "expected (a padded or swizzled layout)", "load it whole (no plan entry)")
        return cut.start // block, -(-cut.stop // block)
    ratio = cut.size // stored if stored else 1
    if stored * ratio != cut.size:
        raise refusal(name, cut, flat, f"stores {stored} {inner} elements for {cut.size} values, not a whole "
                      "number each", "load it whole (no plan entry)")
    if cut.start % ratio or (cut.stop % ratio and cut.stop != cut.size):
        raise refusal(name, cut, flat, f"would split a stored {inner} element holding {ratio} values",
                      f"use a world size whose slices are multiples of {ratio}")
    return cut.start // ratio, -(-cut.stop // ratio)


def local_record(flat: codec.FlatTensor, cut: Cut, parts: dict[str, Any]) -> codec.FlatTensor:
    """The slice as a record: its outer shape, its parts, and size attributes rewritten for it."""
    shape = list(flat.shape)
    shape[cut.dim] = cut.stop - cut.start
    attrs = dict(flat.attrs)
    block = attrs.get("block_size")
    if isinstance(block, (list, tuple)) and block[cut.dim] >= cut.size:
        resized = list(block)
        resized[cut.dim] = cut.stop - cut.start
        attrs["block_size"] = type(block)(resized)
    if "shape" in attrs:
        attrs["shape"] = type(attrs["shape"])(shape)
    return codec.FlatTensor(flat.row, tuple(shape), flat.dtype, parts, attrs)


def check_canonical_cut(name: str, flat: codec.FlatTensor, cut: Cut) -> None:
    """Refuse, at plan time, a cut of device-packed int4 that would split a group (from its attributes)."""
    g = _blocks(flat)[1] if len(flat.shape) == 2 else 0
    if cut.dim == 1 and g > 0 and (cut.start % g or (cut.stop % g and cut.stop != cut.size)):
        raise refusal(name, cut, flat, f"would cut a quantization group of {g}",
                      f"use a world size that divides its {-(-cut.size // g)} groups")


def cut_canonical(name: str, flat: codec.FlatTensor, cut: Cut, packer: str | None,
                  build_on: Any) -> tuple[codec.FlatTensor, str]:
    """Device-packed int4: cut the whole tensor's exact canonical form and re-pack the slice for `build_on`."""
    canon = flat.row.relayout.to_canonical(flat.parts, flat.attrs, packer)
    g = canon.group_size
    if cut.dim == 1 and (cut.start % g or (cut.stop % g and cut.stop != cut.size)):
        raise refusal(name, cut, flat, f"would cut a quantization group of {g}",
                      f"use a world size that divides its {canon.n_groups} groups")
    if cut.dim == 0:
        values, sz = canon.values[cut.start:cut.stop], canon.scale_and_zero[:, cut.start:cut.stop]
    else:
        values, sz = canon.values[:, cut.start:cut.stop], canon.scale_and_zero[cut.start // g:-(-cut.stop // g)]
    local = relayout.Int4Canonical(values.contiguous(), sz.contiguous(), g, (values.shape[0], values.shape[1]),
                                   canon.dtype)
    try:
        parts, attrs, new_packer = flat.row.relayout.from_canonical(local, build_on)
    except PortabilityError as e:
        raise refusal(name, cut, flat, f"cannot be re-packed on {build_on.type} ({e})",
                      f"load it on a {flat.row.packed_for.value} device") from e
    shape = list(flat.shape)
    shape[cut.dim] = cut.stop - cut.start
    return codec.FlatTensor(flat.row, tuple(shape), flat.dtype, parts, attrs), new_packer
