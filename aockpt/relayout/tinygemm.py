"""CUDA tinygemm tile packing (`Int4TilePackedTo4dTensor`) to and from the canonical int4 form.

qdata is int32 [N'/8][K'/(ik*16)][32][ik/2]; N' = N rounded up to 8, K' = K rounded up to 1024 (torchao's
padding), ik = inner_k_tiles in {2, 4, 8}. Each int32 is one lane's B fragment of two m16n8k16 k-tiles:
lane t of tile (nT, kO), pair j holds row n = 8*nT + t//4 and, with k0 = (kO*ik + 2j)*16 + (t%4)*2, the
codes at k0, k0+1, k0+8, k0+9, k0+16, k0+17, k0+24, k0+25 in nibble slots 0, 4, 1, 5, 2, 6, 3, 7 (slot s
at bits 4s..4s+3). Proven bit-identical against `aten._convert_weight_to_int4pack` on an H100
(fixtures/cuda/gpu_evidence.py; docs/portability.md).
"""

from __future__ import annotations

import torch

from ..errors import CorruptCheckpointError, PortabilityError, UnsupportedTensorError
from .canonical import Int4Canonical

PACKER = "cuda-tinygemm"
INNER_K_TILES = (2, 4, 8)
N_TILE = 8
K_ALIGN = 1024  # torchao pads K to this for Int4TilePackedTo4dTensor
_K_TILE = 16


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pack_tiles(codes: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """Pure-torch `aten._convert_weight_to_int4pack`: uint8 codes [N', K'] -> int32 tile layout, any device."""
    n, k = codes.shape
    ik = inner_k_tiles
    if ik not in INNER_K_TILES or n % N_TILE or k % (ik * _K_TILE):
        raise ValueError(f"cannot tile-pack [{n}, {k}] with inner_k_tiles={ik}: need N % 8 == 0, K % {ik * 16} == 0")
    nt, ko = n // N_TILE, k // (ik * _K_TILE)
    # k = kO*ik*16 + j*32 + h*16 + r*8 + t4*2 + p ; n = nT*8 + n_in ; lane t = n_in*4 + t4 ; slot s = p*4 + h*2 + r
    v = codes.reshape(-1, 2, 2, 8)  # [row-run of 32 codes, h, r, (t4 p)]
    b = v[:, :, 0] | (v[:, :, 1] << 4)  # byte = (r=0 low, r=1 high): [run, h, (t4 p)]
    b = b.reshape(-1, 2, 4, 2).permute(0, 2, 3, 1).contiguous()  # [run, t4, p, h]: byte p*2 + h of lane t4's word
    words = b.view(nt, N_TILE, ko, ik // 2, 16).view(torch.int32)  # [nT, n_in, kO, j, t4]
    return words.permute(0, 2, 1, 4, 3).contiguous().view(nt, ko, 32, ik // 2)


def unpack_tiles(qdata: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_tiles: int32 tile layout -> uint8 codes [N', K'], on qdata's device."""
    if qdata.dtype != torch.int32 or qdata.dim() != 4 or qdata.shape[2] != 32 or qdata.shape[3] not in (1, 2, 4):
        raise CorruptCheckpointError(
            f"tile-packed qdata is {qdata.dtype} {tuple(qdata.shape)}, expected int32 [N/8, K/(ik*16), 32, ik/2]"
        )
    nt, ko, _, half_ik = qdata.shape
    words = qdata.view(nt, ko, N_TILE, 4, half_ik).permute(0, 2, 1, 4, 3).contiguous()  # [nT, n_in, kO, j, t4]
    b = words.view(torch.uint8).view(-1, 4, 2, 2).permute(0, 3, 1, 2).contiguous().view(-1, 2, 8)  # [run, h, (t4 p)]
    codes = torch.empty(b.shape[0], 2, 2, 8, dtype=torch.uint8, device=qdata.device)  # [run, h, r, (t4 p)]
    torch.bitwise_and(b, 0x0F, out=codes[:, :, 0])
    torch.bitwise_right_shift(b, 4, out=codes[:, :, 1])
    return codes.view(nt * N_TILE, ko * half_ik * 2 * _K_TILE)


def torch_pack_tiles(codes: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """torch's own CUDA packer (`aten._convert_weight_to_int4pack`); codes must be on a CUDA device."""
    hi_even = (codes[:, 0::2] << 4) | codes[:, 1::2]  # the op wants the even-k code in the high nibble
    return torch.ops.aten._convert_weight_to_int4pack(hi_even.contiguous(), inner_k_tiles)


def to_canonical(parts: dict[str, torch.Tensor], attrs: dict, packer: str = PACKER,
                 allow_inexact: bool = False) -> Int4Canonical:
    """Unpack an Int4TilePackedTo4dTensor's parts (on any device, CPU included) to the canonical form (exact)."""
    if packer != PACKER:
        raise PortabilityError(f"Int4TilePackedTo4dTensor was packed by {packer!r}; only {PACKER!r} is known "
                               "(ROCm packs the same shape differently); re-quantize on the target device")
    if parts.get("act_pre_scale") is not None:
        raise UnsupportedTensorError("Int4TilePackedTo4dTensor with act_pre_scale cannot be re-laid out; re-quantize it")
    n, k = (int(d) for d in attrs["shape"])
    g = int(attrs["block_size"][-1])
    codes = unpack_tiles(parts["qdata"])
    sz = parts["scale_and_zero"]
    if codes.shape[0] < n or codes.shape[1] < k or sz.shape[0] * g < k or sz.shape[1] < n:
        raise CorruptCheckpointError(
            f"tile-packed int4 of shape {(n, k)} has qdata for {tuple(codes.shape)} and scale_and_zero "
            f"{tuple(sz.shape)} with group size {g}: too small"
        )
    return Int4Canonical(
        values=codes[:n, :k].contiguous(),
        scale_and_zero=sz[: -(-k // g), :n].contiguous(),
        group_size=g,
        shape=(n, k),
        dtype=sz.dtype,
    )


def _padding_codes(canon: Int4Canonical, sz_padded: torch.Tensor, n_pad: int, k_pad: int) -> torch.Tensor:
    """Codes torchao writes into the padding: its tinygemm quantization of zeros with each group's params."""
    from torchao.quantization.quant_primitives import _quantize_affine_tinygemm

    g = canon.group_size
    scale, zero = sz_padded[..., 0].t(), sz_padded[..., 1].t()  # [N', G']
    zeros = torch.zeros(n_pad, k_pad, dtype=canon.dtype, device=sz_padded.device)
    q = _quantize_affine_tinygemm(zeros, (1, g), scale, zero, torch.int32, 0, 15)
    return q.to(torch.uint8)


def _zero_group_params(dtype: torch.dtype, group_size: int, device: torch.device) -> torch.Tensor:
    """The (scale, zero) torchao's tinygemm qparams give an all-zero (padding) group."""
    from torchao.quantization.quant_primitives import MappingType, _choose_qparams_affine_tinygemm

    zeros = torch.zeros(1, group_size, dtype=dtype, device=device)
    s, z = _choose_qparams_affine_tinygemm(
        zeros, MappingType.ASYMMETRIC, (1, group_size), torch.int32, 0, 15, scale_dtype=dtype, zero_point_dtype=dtype
    )
    return torch.stack((s.flatten()[0], z.flatten()[0]))


def padded(canon: Int4Canonical, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [N', K'] and scale_and_zero [K'/g, N', 2] padded exactly as torchao pads before packing."""
    n, k = canon.shape
    g = canon.group_size
    n_pad, k_pad = _round_up(n, N_TILE), _round_up(k, K_ALIGN)
    values, sz = canon.values.to(device), canon.scale_and_zero.to(device)
    if (n_pad, k_pad) == (n, k):
        return values, sz
    if k_pad % g:
        raise UnsupportedTensorError(f"group size {g} does not divide the padded K {k_pad}; tinygemm cannot hold it")
    sz_pad = _zero_group_params(canon.dtype, g, device).expand(k_pad // g, n_pad, 2).clone()
    sz_pad[: canon.n_groups, :n] = sz
    codes = _padding_codes(canon, sz_pad, n_pad, k_pad)
    codes[:n, :k] = values
    return codes, sz_pad


def from_canonical(canon: Int4Canonical, device: torch.device, allow_inexact: bool = False, *,
                   inner_k_tiles: int = 8) -> tuple[dict[str, torch.Tensor], dict, str]:
    """Parts, attributes and packer of an Int4TilePackedTo4dTensor on `device`; torch's packer on CUDA, ours
    elsewhere (exact)."""
    device = torch.device(device)
    codes, sz = padded(canon, device)
    pack = torch_pack_tiles if device.type == "cuda" else pack_tiles
    parts = {"qdata": pack(codes, inner_k_tiles), "scale_and_zero": sz.contiguous()}
    return parts, {"block_size": [1, canon.group_size], "shape": torch.Size(canon.shape)}, PACKER
