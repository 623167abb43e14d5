"""The device-independent form every int4 packing converts through, and its one dequantize."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CorruptCheckpointError

MID_POINT = 8  # tinygemm's unsigned-to-signed offset: w = (q - 8) * scale + zero


@dataclass(frozen=True)
class Int4Canonical:
    """Unpacked int4 codes and tinygemm's float zero-point parameters of one weight, at its true size.

    values: uint8 [N, K] in 0..15 (one code per byte, row n = output feature, column k = input feature).
    scale_and_zero: [ceil(K / group_size), N, 2] of `dtype`; [..., 0] is the scale, [..., 1] the zero.
    """

    values: torch.Tensor
    scale_and_zero: torch.Tensor
    group_size: int
    shape: tuple[int, int]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def n_groups(self) -> int:
        """Groups along K, the last one possibly partial."""
        return -(-self.shape[1] // self.group_size)


def _validate(canon: Int4Canonical) -> None:
    """Refuse a canonical form whose parts disagree; a mismatch means a corrupt or misread tensor."""
    n, k = canon.shape
    v, sz = canon.values, canon.scale_and_zero
    problems = []
    if v.dtype != torch.uint8 or tuple(v.shape) != (n, k):
        problems.append(f"values is {v.dtype} {tuple(v.shape)}, expected uint8 {(n, k)}")
    if tuple(sz.shape) != (canon.n_groups, n, 2) or sz.dtype != canon.dtype:
        problems.append(f"scale_and_zero is {sz.dtype} {tuple(sz.shape)}, expected {canon.dtype} {(canon.n_groups, n, 2)}")
    if canon.group_size <= 0:
        problems.append(f"group_size {canon.group_size} is not positive")
    if problems:
        raise CorruptCheckpointError(f"int4 weight of shape {(n, k)} is inconsistent: {'; '.join(problems)}")


def dequantize(canon: Int4Canonical) -> torch.Tensor:
    """The weight in `canon.dtype`: (q - 8) * scale + zero in float32, rounded once (torchao's tinygemm math)."""
    n, k = canon.shape
    g = canon.group_size
    sz = canon.scale_and_zero.to(torch.float32).transpose(0, 1)  # [N, G, 2]
    k_pad = canon.n_groups * g
    q = torch.nn.functional.pad(canon.values, (0, k_pad - k)).view(n, canon.n_groups, g).to(torch.float32)
    w = (q - MID_POINT) * sz[..., 0:1] + sz[..., 1:2]
    return w.view(n, k_pad)[:, :k].to(canon.dtype)


def nibbles_to_bytes(codes: torch.Tensor) -> torch.Tensor:
    """Pack pairs along the last dim into bytes, element 2i in the low nibble, 2i+1 in the high one."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def bytes_to_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of nibbles_to_bytes: the last dim doubles, low nibble first."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
