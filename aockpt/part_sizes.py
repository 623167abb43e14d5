"""What a tensor's outer shape and block size imply for the sizes of its parts: one rule set per family.

Kernels index parts by the outer shape, so a part too small for it is refused before the tensor is used;
layouts that pad (int4 tinygemm tiles pad K and N, swizzled mx/nvfp4 scales) may hold more than the outer
shape needs. Registry rows name their rule set; nothing here knows a type.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CorruptCheckpointError


@dataclass(frozen=True)
class Sizes:
    """What a tensor's outer shape and block size imply for the sizes of its parts."""

    elements: int  # values of the outer (dequantized) tensor
    blocks: int | None  # quantization blocks, one scale each; None where the type records no block size
    attrs: dict[str, Any]


def _blocks(shape: tuple[int, ...], block_size: Any, where: str) -> int | None:
    """Blocks of a shape: per-dimension block sizes, or one int counting values along the flattened tensor."""
    if block_size is None:
        return None
    if type(block_size) is int:
        block_size, shape = [block_size], (math.prod(shape),)
    if len(block_size) != len(shape) or not all(type(b) is int and b > 0 for b in block_size):
        raise CorruptCheckpointError(f"{where}: block_size {list(block_size)} does not fit shape {list(shape)}")
    return math.prod(-(-d // b) for d, b in zip(shape, block_size))


def _bits(part: torch.Tensor) -> int:
    """Bits a part stores (packed parts are measured this way)."""
    return part.numel() * part.element_size() * 8


def _count(part: torch.Tensor) -> int:
    """Elements of a part (scales are measured this way)."""
    return part.numel()


def _mx_bits(s: Sizes) -> int | None:
    """Bits an MX qdata holds: 4 per value for fp4, 8 for fp8, unchecked for other element types."""
    bits = {torch.float4_e2m1fn_x2: 4, torch.float8_e4m3fn: 8, torch.float8_e5m2: 8}.get(s.attrs.get("elem_dtype"))
    return bits and bits * s.elements


Rule = tuple[Callable[[torch.Tensor], int], Callable[[Sizes], int | None], bool]  # measure, expected, at least
Rules = Mapping[str, Rule]  # part -> rule; parts not named are unchecked
_PER_BLOCK: Rule = (_count, lambda s: s.blocks, False)
_BYTE_PER_VALUE: Rule = (_bits, lambda s: 8 * s.elements, False)
_NIBBLE_PER_VALUE: Rule = (_bits, lambda s: 4 * s.elements, False)
_PADDED_NIBBLES: Rule = (_bits, lambda s: 4 * s.elements, True)
_PADDED_PER_BLOCK: Rule = (_count, lambda s: s.blocks, True)

PLAIN: Rules = {}  # an ordinary tensor's one part is the tensor
BYTE_QDATA: Rules = {"qdata": _BYTE_PER_VALUE, "scale": _PER_BLOCK, "zero_point": _PER_BLOCK}  # int8, float8, intx
INT4: Rules = {"qdata": _PADDED_NIBBLES, "scale": _PADDED_PER_BLOCK, "zero_point": _PADDED_PER_BLOCK,
               "group_scale": _PADDED_PER_BLOCK, "group_zero": _PADDED_PER_BLOCK,
               "scale_and_zero": (_count, lambda s: s.blocks and 2 * s.blocks, True)}
MX: Rules = {"qdata": (_bits, _mx_bits, False), "scale": _PADDED_PER_BLOCK}
NVFP4: Rules = {"qdata": _NIBBLE_PER_VALUE, "scale": _PADDED_PER_BLOCK}
NF4: Rules = {"quantized_data": _NIBBLE_PER_VALUE, "quantized_scalers": _PER_BLOCK,
              "nf4": (_count, lambda s: 16, False),
              "quantization_factor": (_count, lambda s: s.blocks and s.blocks // s.attrs["scaler_block_size"], False)}


def check(rules: Rules, type_name: str, parts: dict[str, torch.Tensor], attrs: dict[str, Any],
          shape: tuple[int, ...], where: str) -> None:
    """Refuse parts whose sizes disagree with the outer shape and block size."""
    try:
        sizes = Sizes(math.prod(shape), _blocks(shape, attrs.get("block_size"), where), attrs)
        checks = [(name, measure(parts[name]), expected(sizes), at_least)
                  for name, (measure, expected, at_least) in rules.items() if name in parts]
    except (ArithmeticError, TypeError, KeyError) as e:
        raise CorruptCheckpointError(f"{where}: {type_name} attributes do not describe its parts ({e})") from e
    for name, got, want, at_least in checks:
        if want is not None and (got < want if at_least else got != want):
            unit = "bits" if rules[name][0] is _bits else "values"
            raise CorruptCheckpointError(
                f"{where}: {type_name} part {name!r} holds {got} {unit}, but a {list(shape)} tensor with "
                f"block_size {attrs.get('block_size')} needs {'at least ' if at_least else ''}{want}; "
                "the file is inconsistent: re-export it"
            )


PartShapes = Callable[[int, int, int], dict[str, tuple[int, ...]]]  # (N, K, group) -> part -> exact shape


@dataclass(frozen=True)
class Int4Geometry:
    """What an int4 record's `shape` and `block_size` must be, and (unpadded layouts) its parts' exact shapes."""

    ranks: tuple[int, ...] = (2,)  # 3-D (expert) weights where the layout holds them
    # exact part shapes for an (N, K) weight with group size g: kernels index them by these, so a transposed
    # or doubled part would compute junk or read out of bounds; None for padded layouts
    part_shapes: PartShapes | None = None

    def check(self, type_name: str, parts: dict[str, torch.Tensor], attrs: dict[str, Any], where: str) -> None:
        """One group size dividing K, one block size per dimension, and parts of the shape that implies."""
        shape, block = list(attrs.get("shape") or []), attrs.get("block_size")
        if len(shape) not in self.ranks or not isinstance(block, (list, tuple)) or len(block) != len(shape):
            raise CorruptCheckpointError(
                f"{where}: {type_name} shape {shape[:4]} with block_size {block} is not a "
                f"{' or '.join(f'{r}-D' for r in self.ranks)} int4 weight with one block size per dimension"
            )
        *lead, k = shape
        *ones, group = block
        if any(b != 1 for b in ones) or not (type(group) is int and 0 < group <= k and k % group == 0 and k % 8 == 0):
            raise CorruptCheckpointError(
                f"{where}: {type_name} block_size {list(block)} is not [1, ..., group] with a group size dividing "
                f"K={k} (K a multiple of 8); the file is inconsistent: re-export it"
            )
        if self.part_shapes is None or len(shape) != 2:
            return
        for name, want in self.part_shapes(shape[0], k, group).items():
            if name in parts and tuple(parts[name].shape) != want:
                raise CorruptCheckpointError(
                    f"{where}: {type_name} part {name!r} is {list(parts[name].shape)}, but a {shape} weight "
                    f"with group size {group} stores it as {list(want)}; the file is inconsistent: re-export it"
                )


@dataclass(frozen=True)
class Int4TileGeometry(Int4Geometry):
    """tinygemm tiles: qdata is [N'/8, K'/(16 t), 32, t/2] for inner_k_tiles t in 2, 4, 8, with N padded to
    N' (a multiple of 8, less than 8 more) and K to K' (less than 1024 more); scale_and_zero is
    [groups, N', 2], groups from K/g (torchao 0.18) to K'/g (torchao <= 0.17 padded them too)."""

    def check(self, type_name: str, parts: dict[str, torch.Tensor], attrs: dict[str, Any], where: str) -> None:
        super().check(type_name, parts, attrs, where)
        (n, k), group = attrs["shape"], attrs["block_size"][-1]
        q, sz = parts.get("qdata"), parts.get("scale_and_zero")
        fits = q is not None and q.dim() == 4 and q.shape[2] == 32 and q.shape[3] in (1, 2, 4)
        n_pad, k_pad = (q.shape[0] * 8, q.shape[1] * q.shape[3] * 32) if fits else (0, 0)
        fits = fits and n <= n_pad < n + 8 and k <= k_pad < k + 1024 and k_pad % group == 0
        if not fits or sz is None or sz.dim() != 3 or not (
                sz.shape[1] == n_pad and sz.shape[2] == 2 and k // group <= sz.shape[0] <= k_pad // group):
            raise CorruptCheckpointError(
                f"{where}: {type_name} parts qdata {list(getattr(q, 'shape', []))} and scale_and_zero "
                f"{list(getattr(sz, 'shape', []))} are not tinygemm tiles of a {[n, k]} weight with group size "
                f"{group}; the file is inconsistent: re-export it"
            )


INT4_TILES = Int4TileGeometry()  # tinygemm tiles pad K and N: shapes within the padding
INT4_OPAQUE = Int4Geometry(part_shapes=lambda n, k, g: {"qdata": (n, k // 2), "scale_and_zero": (k // g, n, 2)})
INT4_PLAIN = Int4Geometry((2, 3), lambda n, k, g: {"qdata": (n, k // 2), "scale": (k // g, n),
                                                   "zero_point": (k // g, n)})
INT4_PRESHUFFLED = Int4Geometry((2, 3), lambda n, k, g: {"qdata": (n, k // 2), "group_scale": (k // g, n),
                                                         "group_zero": (k // g, n)})
INT4_PLAIN_INT32 = Int4Geometry(part_shapes=lambda n, k, g: {"qdata": (n, k // 8), "scale": (k // g, n),
                                                             "zero_point": (k // g, n)})
