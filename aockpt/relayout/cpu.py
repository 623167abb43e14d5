"""CPU int4 packing (`Int4OpaqueTensor`, `aten._convert_weight_to_int4pack_for_cpu`) to and from canonical form.

qdata is uint8 [N, K/2] whose bytes are, block after block of `block` rows, a [K][rows/2] array: on the
"halves" ISAs (AVX512: 64 rows, AVX2: 32 rows) byte d of column k holds row d in its low nibble and row
d + block/2 in its high one; on the "pairs" path (x86 without AVX2, and every tail block shorter than
`block`) byte d holds rows 2d (low) and 2d+1 (high). Which one a tensor uses depends on the ISA torch
picked at pack time, so the packer is recorded by name and an unknown one is refused. Files that
do not record it (torch pickles, torchao/transformers folders) hold no trace of it either: only a
weight of 16 rows reads the same under every packing (`packings_agree`); for any other, the user
states it (`chosen_packer`), and nothing is guessed.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch

from ..errors import CorruptCheckpointError, PortabilityError, UnsupportedTensorError, UsageError
from .canonical import Int4Canonical, bytes_to_nibbles, nibbles_to_bytes


@dataclass(frozen=True)
class CpuPacking:
    """How one ISA's torch build interleaves int4 rows."""

    block: int  # rows per block
    halves: bool  # True: low nibble row d, high row d + block/2; False: row pairs


PACKINGS: dict[str, CpuPacking] = {
    "cpu-avx512": CpuPacking(64, True),
    "cpu-avx2": CpuPacking(32, True),
    "cpu-default": CpuPacking(32, False),  # x86-64 build without AVX2 (Vectorized<float> of 8 lanes)
}

ROW_ALIGN = 16  # torch's CPU packer needs N % 16 == 0
NATIVE = "native"  # a user's word for "this machine's packer" (they made the file here)


def cpu_packer() -> str:
    """The packing this process's torch writes, e.g. 'cpu-avx512'; non-x86 names are not in PACKINGS."""
    cap = torch.backends.cpu.get_cpu_capability().lower()
    machine = platform.machine().lower()
    return f"cpu-{cap}" if machine in ("x86_64", "amd64") else f"cpu-{machine}-{cap}"


def chosen_packer(choice: str | None) -> str | None:
    """A user's `cpu_packer=` choice as a packer name ('native' is this machine's); None stays None."""
    if choice is None or choice in PACKINGS:
        return choice
    if choice == NATIVE:
        return cpu_packer()
    raise UsageError(f"cpu_packer={choice!r} is not a CPU int4 packer; use one of {NATIVE}, {', '.join(PACKINGS)}")


def _segments(n: int, packing: CpuPacking) -> tuple[tuple[int, bool], ...]:
    """The (rows, halves) runs one packing lays an N-row weight out in; equal runs mean equal bytes."""
    full, tail = _split(n, packing.block)
    return ((packing.block, packing.halves),) * full + (((tail, False),) if tail else ())


def packings_agree(n: int) -> bool:
    """Whether every known packing writes an N-row weight identically, so its unknown packer does not matter."""
    return len({_segments(n, p) for p in PACKINGS.values()}) == 1


def packing_for(packer: str, where: str) -> CpuPacking:
    """The layout a packer name stands for; an unknown packer cannot be read back exactly."""
    found = PACKINGS.get(packer)
    if found is None:
        raise PortabilityError(
            f"{where} was packed for CPU by {packer!r}, whose int4 layout aockpt does not know "
            f"(known: {', '.join(PACKINGS)}); load it on a machine with the same CPU packer or re-quantize"
        )
    return found


def _split(n: int, block: int) -> tuple[int, int]:
    """(full blocks, rows in the tail block)."""
    return n // block, n % block


def unpack_cpu(qdata: torch.Tensor, n: int, k: int, packing: CpuPacking) -> torch.Tensor:
    """uint8 codes [N, K] from CPU-packed qdata [N, K/2]."""
    if qdata.dtype != torch.uint8 or qdata.numel() * 2 != n * k or n % 2 or k % 2:
        raise CorruptCheckpointError(f"CPU int4 qdata is {qdata.dtype} {tuple(qdata.shape)}, expected uint8 [{n}, {k // 2}]")
    b = packing.block
    full, tail = _split(n, b)
    flat = qdata.contiguous().view(-1)
    main = flat[: full * k * b // 2].view(full, k, b // 2).transpose(1, 2).contiguous()  # [blk, byte d, K]
    codes = torch.empty(n, k, dtype=torch.uint8)
    rows = codes[: full * b].view(full, b // 2, 2, k) if not packing.halves else codes[: full * b].view(full, 2, b // 2, k)
    lo, hi = (rows[:, :, 0], rows[:, :, 1]) if not packing.halves else (rows[:, 0], rows[:, 1])
    torch.bitwise_and(main, 0x0F, out=lo)
    torch.bitwise_right_shift(main, 4, out=hi)
    if tail:
        codes[full * b :] = bytes_to_nibbles(flat[full * k * b // 2 :].view(k, tail // 2)).t()
    return codes


def pack_cpu(codes: torch.Tensor, packing: CpuPacking) -> torch.Tensor:
    """Pure-torch `_convert_weight_to_int4pack_for_cpu` for any known ISA: codes [N, K] -> uint8 [N, K/2]."""
    n, k = codes.shape
    b = packing.block
    full, tail = _split(n, b)
    main = codes[: full * b]
    if packing.halves:  # low nibble row d, high nibble row d + b/2
        rows = main.view(full, 2, b // 2, k)
        byte = rows[:, 0] | (rows[:, 1] << 4)
    else:  # low nibble row 2d, high nibble row 2d + 1
        rows = main.view(full, b // 2, 2, k)
        byte = rows[:, :, 0] | (rows[:, :, 1] << 4)
    parts = [byte.transpose(1, 2).reshape(-1)]  # [blk, K, byte d]
    if tail:
        parts.append(nibbles_to_bytes(codes[full * b :].t().contiguous()).reshape(-1))
    return torch.cat(parts).view(n, k // 2)


def torch_pack_cpu(codes: torch.Tensor) -> torch.Tensor:
    """torch's own CPU packer, which writes this machine's layout (`cpu_packer()`)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def to_canonical(parts: dict[str, torch.Tensor], attrs: dict, packer: str, allow_inexact: bool = False) -> Int4Canonical:
    """Unpack an Int4OpaqueTensor (A16W4 tinygemm path) packed by `packer` to the canonical form."""
    if attrs.get("act_mapping_type") is not None or parts.get("act_pre_scale") is not None:
        raise UnsupportedTensorError("Int4OpaqueTensor of the DA8W4 path or with act_pre_scale cannot be re-laid out")
    n, k = (int(d) for d in attrs["shape"])
    codes = unpack_cpu(parts["qdata"], n, k, packing_for(packer, f"an int4 weight of shape {(n, k)}"))
    sz = parts["scale_and_zero"]
    return Int4Canonical(codes, sz.contiguous(), int(attrs["block_size"][-1]), (n, k), sz.dtype)


def from_canonical(canon: Int4Canonical, device: torch.device | None = None, allow_inexact: bool = False, *,
                   packer: str | None = None) -> tuple[dict[str, torch.Tensor], dict, str]:
    """Parts, attributes and packer of an Int4OpaqueTensor packed as `packer` (default: this machine's), on
    the CPU, the only device its kernel runs on (exact)."""
    n, k = canon.shape
    if n % ROW_ALIGN or k % 2:
        raise UnsupportedTensorError(f"int4 weight of shape {(n, k)} cannot be CPU-packed: N must be a multiple of 16")
    here = cpu_packer()
    packer = packer or here
    codes = canon.values.cpu()
    known = PACKINGS.get(packer)  # ours is proven identical to torch's op and twice as fast; torch's for the rest
    if known is None and packer != here:
        packing_for(packer, "the requested packing")
    qdata = pack_cpu(codes, known) if known is not None else torch_pack_cpu(codes)
    parts = {"qdata": qdata, "scale_and_zero": canon.scale_and_zero.cpu().contiguous()}
    attrs = {"block_size": [1, canon.group_size], "shape": torch.Size(canon.shape), "act_mapping_type": None}
    return parts, attrs, packer
