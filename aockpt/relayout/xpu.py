"""XPU int4 (`Int4PlainInt32Tensor`, oneDNN) to and from canonical form; the zero-point domains differ.

qdata is int32 [N, K/8]: the little-endian bytes of uint8 [N, K/2] with the even-k code in the low nibble
(torch-xpu-ops' `_convert_weight_to_int4pack` copies the bytes). scale is [K/g, N] of the weight dtype,
zero_point int8 [K/g, N], and w = (q - zero_point) * scale. Tinygemm's float zero (w = (q - 8) * s + z)
maps to an integer zero point only when z / s is an integer, so each conversion compares the two
dequantized weights and refuses unless they are bit-identical or the caller allows the error.
"""

from __future__ import annotations

import warnings

import torch

from ..errors import CorruptCheckpointError, PortabilityError, UnsupportedTensorError
from .canonical import MID_POINT, Int4Canonical, bytes_to_nibbles, dequantize, nibbles_to_bytes

PACKER = "xpu"


def _xpu_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, g: int) -> torch.Tensor:
    """(q - zero_point) * scale in float32, rounded once to scale's dtype."""
    n, k = codes.shape
    q = codes.view(n, k // g, g).to(torch.float32)
    w = (q - zero_point.t().unsqueeze(-1).to(torch.float32)) * scale.t().unsqueeze(-1).to(torch.float32)
    return w.view(n, k).to(scale.dtype)


def _checked(exact: torch.Tensor, approx: torch.Tensor, allow_inexact: bool, what: str) -> float:
    """Max abs difference of two dequantized weights; refuses a non-zero one unless allowed."""
    if torch.equal(exact.view(torch.uint8), approx.view(torch.uint8)):
        return 0.0
    err = float((exact.to(torch.float32) - approx.to(torch.float32)).abs().max())
    if not allow_inexact:
        raise PortabilityError(
            f"{what}: the float zero point does not map exactly to an integer one (max abs error {err:.3g}); "
            f"pass allow_inexact=True to accept it, or keep the weight on a device with a tinygemm kernel"
        )
    return err


def to_canonical(parts: dict[str, torch.Tensor], attrs: dict, packer: str = PACKER,
                 allow_inexact: bool = False) -> Int4Canonical:
    """Canonical form of an Int4PlainInt32Tensor; an inexact one (allowed) warns with its error."""
    canon, err = measured_to_canonical(parts, attrs, allow_inexact=allow_inexact)
    _warn_if_inexact(err)
    return canon


def from_canonical(canon: Int4Canonical, device: torch.device, allow_inexact: bool = False
                   ) -> tuple[dict[str, torch.Tensor], dict, str]:
    """Parts, attributes and packer of an Int4PlainInt32Tensor on `device`; an inexact one (allowed) warns."""
    parts, attrs, err = measured_from_canonical(canon, torch.device(device), allow_inexact=allow_inexact)
    _warn_if_inexact(err)
    return parts, attrs, PACKER


def _warn_if_inexact(err: float) -> None:
    """Say by how much an allowed inexact conversion changed the dequantized weights."""
    if err:
        warnings.warn(f"Int4PlainInt32Tensor re-layout changed dequantized weights by up to {err:.3g} "
                      "(allow_inexact=True)")


def measured_to_canonical(
    parts: dict[str, torch.Tensor], attrs: dict, *, allow_inexact: bool = False
) -> tuple[Int4Canonical, float]:
    """Canonical form of an Int4PlainInt32Tensor and the max abs dequantization error that introduced."""
    if parts.get("act_pre_scale") is not None:
        raise UnsupportedTensorError("Int4PlainInt32Tensor with act_pre_scale cannot be re-laid out; re-quantize it")
    n, k = (int(d) for d in attrs["shape"])
    g = int(attrs["block_size"][-1])
    qdata, scale, zp = parts["qdata"], parts["scale"], parts["zero_point"]
    if qdata.dtype != torch.int32 or tuple(qdata.shape) != (n, k // 8) or k % g or tuple(scale.shape) != (k // g, n):
        raise CorruptCheckpointError(f"XPU int4 of shape {(n, k)}: qdata {tuple(qdata.shape)}, scale {tuple(scale.shape)}")
    codes = bytes_to_nibbles(qdata.cpu().contiguous().view(torch.uint8)).view(n, k)
    scale, zp = scale.cpu(), zp.cpu()
    zero = ((MID_POINT - zp.to(torch.float32)) * scale.to(torch.float32)).to(scale.dtype)
    canon = Int4Canonical(codes, torch.stack((scale, zero), dim=-1), g, (n, k), scale.dtype)
    err = _checked(_xpu_dequantize(codes, scale, zp, g), dequantize(canon), allow_inexact, f"XPU int4 of shape {(n, k)}")
    return canon, err


def measured_from_canonical(
    canon: Int4Canonical, device: torch.device, *, allow_inexact: bool = False
) -> tuple[dict[str, torch.Tensor], dict, float]:
    """Parts and attributes of an Int4PlainInt32Tensor, and the max abs dequantization error introduced."""
    n, k = canon.shape
    g = canon.group_size
    if k % g or k % 8:
        raise UnsupportedTensorError(f"int4 weight of shape {(n, k)} cannot be XPU-packed: K must divide by 8 and {g}")
    scale = canon.scale_and_zero[..., 0]
    ratio = canon.scale_and_zero[..., 1].to(torch.float32) / scale.to(torch.float32)
    zp = torch.round(MID_POINT - ratio).clamp(-128, 127).to(torch.int8)
    err = _checked(dequantize(canon), _xpu_dequantize(canon.values, scale, zp, g), allow_inexact,
                   f"int4 weight of shape {(n, k)} for XPU")
    qdata = nibbles_to_bytes(canon.values).contiguous().view(torch.int32)
    parts = {"qdata": qdata.to(device), "scale": scale.contiguous().to(device), "zero_point": zp.contiguous().to(device)}
    return parts, {"block_size": [1, g], "shape": torch.Size(canon.shape)}, err
