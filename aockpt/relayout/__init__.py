"""Exact int4 re-layout between device packings, through one canonical form; never re-quantizes.

Every converter is a pure function on plain tensors and the attribute dict `__tensor_flatten__()`
returns, so a checkpoint can be re-packed for another device without the torchao subclass or the
source device. `packer` names the packing that wrote the bytes ('cuda-tinygemm', 'cpu-avx512',
'cpu-avx2', 'cpu-default', 'xpu'); an unknown one is refused, never guessed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import PortabilityError, UnsupportedTensorError
from . import cpu, tinygemm, xpu
from .canonical import Int4Canonical, dequantize
from .cpu import cpu_packer

if TYPE_CHECKING:
    from ..registry import TensorType

__all__ = ["Int4Canonical", "dequantize", "cpu_packer", "to_canonical", "from_canonical", "relayout", "target"]

Parts = dict[str, torch.Tensor]


def _warn_if_inexact(err: float, type_name: str) -> None:
    if err:
        warnings.warn(f"{type_name} re-layout changed dequantized weights by up to {err:.3g} (allow_inexact=True)")


def _tile_to(parts: Parts, attrs: dict, packer: str, allow_inexact: bool) -> Int4Canonical:
    if packer != tinygemm.PACKER:
        raise PortabilityError(
            f"Int4TilePackedTo4dTensor was packed by {packer!r}; only {tinygemm.PACKER!r} is known "
            f"(ROCm packs the same shape differently); re-quantize on the target device"
        )
    return tinygemm.to_canonical(parts, attrs)


def _tile_from(canon: Int4Canonical, device: torch.device, allow_inexact: bool) -> tuple[Parts, dict, str]:
    return (*tinygemm.from_canonical(canon, device), tinygemm.PACKER)


def _cpu_to(parts: Parts, attrs: dict, packer: str, allow_inexact: bool) -> Int4Canonical:
    return cpu.to_canonical(parts, attrs, packer=packer)


def _cpu_from(canon: Int4Canonical, device: torch.device, allow_inexact: bool) -> tuple[Parts, dict, str]:
    return cpu.from_canonical(canon)


def _xpu_to(parts: Parts, attrs: dict, packer: str, allow_inexact: bool) -> Int4Canonical:
    canon, err = xpu.to_canonical(parts, attrs, allow_inexact=allow_inexact)
    _warn_if_inexact(err, "Int4PlainInt32Tensor")
    return canon


def _xpu_from(canon: Int4Canonical, device: torch.device, allow_inexact: bool) -> tuple[Parts, dict, str]:
    parts, attrs, err = xpu.from_canonical(canon, device, allow_inexact=allow_inexact)
    _warn_if_inexact(err, "Int4PlainInt32Tensor")
    return parts, attrs, xpu.PACKER


@dataclass(frozen=True)
class Converter:
    """One int4 layout's way into and out of the canonical form (a registry row's `relayout` field)."""

    to_canonical: Callable[[Parts, dict, str, bool], Int4Canonical]
    from_canonical: Callable[[Int4Canonical, torch.device, bool], tuple[Parts, dict, str]]


TILE_PACKED = Converter(_tile_to, _tile_from)
OPAQUE = Converter(_cpu_to, _cpu_from)
PLAIN_INT32 = Converter(_xpu_to, _xpu_from)


def _rows() -> dict[str, TensorType]:
    """The registry rows that carry a converter, by type name (imported on call: those rows name the
    converters above, so the registry imports this package, never the other way round at import time)."""
    from ..registry import relayout_types

    return relayout_types()


def _converter(type_name: str) -> Converter:
    found = _rows().get(type_name)
    if found is None:
        raise UnsupportedTensorError(f"{type_name!r} has no int4 re-layout; re-layout handles {', '.join(_rows())}")
    return found.relayout


def to_canonical(
    type_name: str, parts: Parts, attrs: dict, *, packer: str, allow_inexact: bool = False
) -> Int4Canonical:
    """Unpack one int4 tensor's parts (any device, CPU included) into the canonical form.

    Raises:
        UnsupportedTensorError: the type has no re-layout, or uses an option re-layout cannot carry.
        PortabilityError: the packer is unknown, or (XPU) the zero point does not convert exactly.
        CorruptCheckpointError: the parts' shapes or dtypes disagree with the attributes.
    """
    return _converter(type_name).to_canonical(parts, attrs, packer, allow_inexact)


def from_canonical(
    canon: Int4Canonical, type_name: str, device: str | torch.device, *, allow_inexact: bool = False
) -> tuple[Parts, dict, str]:
    """Pack the canonical form as `type_name` on `device`: (parts, attrs, packer)."""
    return _converter(type_name).from_canonical(canon, torch.device(device), allow_inexact)


def target(device_type: str) -> str | None:
    """The int4 type whose kernel runs on `device_type` and that re-layout can pack, or None."""
    return next((name for name, t in _rows().items() if t.packed_for == device_type), None)


def relayout(
    type_name: str,
    parts: Parts,
    attrs: dict,
    *,
    packer: str,
    target_device: str | torch.device,
    allow_inexact: bool = False,
    build_on: str | torch.device | None = None,
) -> tuple[str, Parts, dict, str]:
    """Re-pack one int4 tensor for the kernel of `target_device`: (new_type_name, parts, attrs, packer).

    The new parts are built on `build_on` (default: the target itself), e.g. the CPU when packing a
    checkpoint for a device this machine lacks.
    """
    device = torch.device(target_device)
    new_type = target(device.type)
    if new_type is None:
        targets = ", ".join(t.packed_for.value for t in _rows().values())
        raise PortabilityError(f"no int4 kernel layout is known for device {device.type!r}; targets: {targets}")
    canon = to_canonical(type_name, parts, attrs, packer=packer, allow_inexact=allow_inexact)
    new_parts, new_attrs, new_packer = from_canonical(canon, new_type, device if build_on is None else build_on,
                                                      allow_inexact=allow_inexact)
    return new_type, new_parts, new_attrs, new_packer
