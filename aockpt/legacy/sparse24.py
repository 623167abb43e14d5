"""2:4-sparse packings of old torchao layouts (cuSPARSELt, Marlin 2:4) decoded to dense values on any device.

Both packings keep the 2 non-zeros of every 4 weights plus 2-bit positions; decoding scatters the kept
values back, so the dense weight is exactly what the packer was given. Pure torch, no kernel needed.
"""

from __future__ import annotations

import torch

from ..errors import CorruptCheckpointError

# cuSPARSELt (0.8, measured on an H100 against torch._cslt_compress: fixtures/cuda/cslt): the kept
# values row-major, then 4-bit position codes (first index | second << 2), two per byte, in tiles of
# 64 rows x 16 groups of 4 (rows and columns padded to 64). Inside a tile the nibble index takes its
# bits, low to high, from: group bit 0, row bit 3, group bits 3, 1, 2, row bits 0, 1, 2, 4, 5.
_CSLT_TILE_ROWS, _CSLT_TILE_GROUPS = 64, 16
_CSLT_NIBBLE_BITS = (("g", 0), ("r", 3), ("g", 3), ("g", 1), ("g", 2), ("r", 0), ("r", 1), ("r", 2), ("r", 4), ("r", 5))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def cusparselt_size(rows: int, cols: int) -> int:
    """Bytes torch._cslt_compress makes of an int8 [rows, cols] matrix: values plus padded metadata tiles."""
    tiles = _ceil_div(rows, _CSLT_TILE_ROWS) * _ceil_div(cols // 4, _CSLT_TILE_GROUPS)
    return rows * cols // 2 + tiles * _CSLT_TILE_ROWS * _CSLT_TILE_GROUPS // 2


def _interleaved(local: dict[str, torch.Tensor], bits: tuple[tuple[str, int], ...]) -> torch.Tensor:
    """An index whose bit i is bit `bits[i][1]` of coordinate `bits[i][0]` (the layouts are bit shuffles)."""
    return sum(((local[axis] >> bit) & 1) << i for i, (axis, bit) in enumerate(bits))


def _cslt_nibble_index(rows: int, groups: int, device: torch.device) -> torch.Tensor:
    """For every (row, group of 4), where its position code sits among the metadata nibbles."""
    r = torch.arange(rows, device=device).view(-1, 1)
    g = torch.arange(groups, device=device).view(1, -1)
    tile = (r // _CSLT_TILE_ROWS) * _ceil_div(groups, _CSLT_TILE_GROUPS) + g // _CSLT_TILE_GROUPS
    inner = _interleaved({"r": r % _CSLT_TILE_ROWS, "g": g % _CSLT_TILE_GROUPS}, _CSLT_NIBBLE_BITS)
    return tile * (_CSLT_TILE_ROWS * _CSLT_TILE_GROUPS) + inner


def _decode_pairs(values: torch.Tensor, meta: torch.Tensor, nibble: torch.Tensor, where: str) -> torch.Tensor:
    """Dense [rows, groups*4] from each group's two kept values and its 4-bit code at `nibble` in `meta`."""
    code = (meta.contiguous().view(-1).view(torch.uint8).to(torch.int64)[nibble // 2] >> (4 * (nibble % 2))) & 0xF
    first, second = code & 3, code >> 2
    if bool((first >= second).any()):
        raise CorruptCheckpointError(f"{where}: a 2:4 position code names the same or a reversed position; "
                                     "the file is corrupt")
    dense = torch.zeros(*values.shape[:2], 4, dtype=values.dtype, device=values.device)
    dense.scatter_(2, torch.stack((first, second), dim=-1), values)
    return dense.flatten(1)


def cusparselt_to_dense(packed: torch.Tensor, rows: int, cols: int, where: str) -> torch.Tensor:
    """The int8 [rows, cols] matrix a torch._cslt_compress output holds (the inverse of that compression)."""
    if packed.dtype != torch.int8 or cols % 4 or packed.numel() != cusparselt_size(rows, cols):
        raise CorruptCheckpointError(
            f"{where}: {packed.dtype} cuSPARSELt data of {packed.numel()} bytes cannot hold a {rows}x{cols} int8 "
            f"2:4 matrix ({cusparselt_size(rows, cols)} bytes); the file is corrupt")
    flat = packed.contiguous().view(-1)
    values = flat[: rows * cols // 2].view(rows, cols // 4, 2)
    return _decode_pairs(values, flat[rows * cols // 2:], _cslt_nibble_index(rows, cols // 4, packed.device), where)


# Marlin 2:4 (IST-DASLab Sparse-Marlin, as torchao 0.7-0.15 packed int4): 4-bit codes, 8 per int32,
# in 16x16 tiles whose 256 entries x 4 are ordered for the mma.m16n8k16 fragments; scales reordered in
# groups of 8. Positions: int16 words of 4 codes (16 columns of a row), word (r, c) of [n, k/16] at
# (c // 2) * 2n + (r // 64) * 128 + the bits below of (r % 64, c % 2). Checked against torchao 0.13's
# own packer: fixtures/legacy/marlin24 (and the real H100 pickle in ao0.13-cuda-sparse).
_MARLIN_TILE = 16
_MARLIN_META_BITS = (("r", 2), ("c", 0), ("r", 0), ("r", 3), ("r", 4), ("r", 5), ("r", 1))
_MARLIN_SCALE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
_MARLIN_NIBBLE_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _marlin_fragment_order() -> torch.Tensor:
    """Position in a [32, 16*16]-tile row of each of the 1024 packed 4-bit codes, in packing order."""
    i = torch.arange(32).view(32, 1, 1, 1)
    j = torch.arange(4).view(1, 4, 1, 1)
    block = torch.arange(2).view(1, 1, 2, 1)
    pair = (i % 4) * 2
    row = torch.stack((pair, pair + 1, pair + 8, pair + 9), dim=-1).view(32, 1, 1, 4)
    order = 16 * row + (i // 8) * 256 + 8 * ((i // 4) % 2) + 4 * block + j
    return order.flatten().view(-1, 8)[:, list(_MARLIN_NIBBLE_ORDER)].flatten()


def _marlin_nibble_index(rows: int, groups: int, device: torch.device) -> torch.Tensor:
    """For every (row, group of 4), where its position code sits among Marlin's metadata nibbles."""
    r = torch.arange(rows, device=device).view(-1, 1)
    g = torch.arange(groups, device=device).view(1, -1)
    c = g // 4
    word = (c >> 1) * 2 * rows + (r >> 6) * 128 + _interleaved({"r": r % 64, "c": c % 2}, _MARLIN_META_BITS)
    return word * 4 + g % 4


def marlin24_to_dense(packed: torch.Tensor, scale: torch.Tensor, meta: torch.Tensor, k: int, n: int,
                      group_size: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned 4-bit codes [n, k] and fp16 scales [n, k // group_size] of a Marlin 2:4 packed int4 weight."""
    kc = k // 2  # the compressed depth
    shapes_ok = (packed.dtype == torch.int32 and meta.dtype == torch.int16 and k % 128 == 0 and n % 64 == 0
                 and group_size > 0 and k % group_size == 0 and packed.numel() == kc * n // 8
                 and meta.numel() == n * kc // 8 and scale.numel() == n * (k // group_size))
    if not shapes_ok:
        raise CorruptCheckpointError(
            f"{where}: Marlin 2:4 parts {tuple(packed.shape)} {packed.dtype}, meta {tuple(meta.shape)} {meta.dtype}, "
            f"scale {tuple(scale.shape)} do not describe a {n}x{k} int4 weight with groups of {group_size}; "
            "the file is corrupt")
    words = packed.contiguous().view(kc // _MARLIN_TILE, -1).to(torch.int64)
    codes = torch.stack([(words >> (4 * s)) & 0xF for s in range(8)], dim=-1).flatten(1)
    tiled = torch.empty_like(codes)
    tiled.view(-1, 1024)[:, _marlin_fragment_order().to(codes.device)] = codes.view(-1, 1024)
    compressed = (tiled.view(kc // _MARLIN_TILE, n // _MARLIN_TILE, _MARLIN_TILE, _MARLIN_TILE)
                  .permute(0, 2, 1, 3).reshape(kc, n))
    values = (compressed.t() - 8).reshape(n, k // 4, 2)  # Marlin compresses q - 8: pruned weights decode to 8
    dense = _decode_pairs(values, meta, _marlin_nibble_index(n, k // 4, packed.device), where) + 8
    scales = scale.contiguous().view(-1, 8)
    if k // group_size > 1:  # torchao reorders scales only when there is more than one group
        unordered = torch.empty_like(scales)
        unordered[:, list(_MARLIN_SCALE_ORDER)] = scales
        scales = unordered
    return dense, scales.reshape(k // group_size, n).t().contiguous()
