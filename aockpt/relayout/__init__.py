"""Exact int4 re-layout between device packings, through one canonical form; never re-quantizes.

Each layout module (``tinygemm``, ``cpu``, ``xpu``) is a converter: two functions on plain tensors and the
attribute dict ``__tensor_flatten__()`` returns, with one signature everywhere --
``to_canonical(parts, attrs, packer, allow_inexact) -> Int4Canonical`` and
``from_canonical(canon, device, allow_inexact) -> (parts, attrs, packer)`` -- so a checkpoint can be
re-packed for another device without the torchao subclass or the source device. A registry row names
its converter (``TensorType.relayout``); nothing here looks the registry up. `packer` names the packing
that wrote the bytes ('cuda-tinygemm', 'cpu-avx512', 'cpu-avx2', 'cpu-default', 'xpu'); an unknown one
is refused, never guessed.
"""

from __future__ import annotations

from typing import Protocol

import torch

from . import cpu, tinygemm, xpu
from .canonical import Int4Canonical, dequantize
from .cpu import cpu_packer

__all__ = ["Converter", "Int4Canonical", "dequantize", "cpu_packer", "relayout", "cpu", "tinygemm", "xpu"]

Parts = dict[str, torch.Tensor]


class Converter(Protocol):
    """One int4 layout's way into and out of the canonical form (a registry row's `relayout` field)."""

    def to_canonical(self, parts: Parts, attrs: dict, packer: str, allow_inexact: bool = False) -> Int4Canonical:
        """Unpack one tensor's parts (any device) into the canonical form."""

    def from_canonical(self, canon: Int4Canonical, device: torch.device,
                       allow_inexact: bool = False) -> tuple[Parts, dict, str]:
        """Pack the canonical form on `device`: (parts, attrs, packer)."""


def relayout(source: Converter, target: Converter, parts: Parts, attrs: dict, *, packer: str,
             build_on: str | torch.device, allow_inexact: bool = False) -> tuple[Parts, dict, str]:
    """Re-pack one int4 tensor from `source`'s layout (written by `packer`) into `target`'s, built on
    `build_on` (the target device itself, or the CPU when packing for a device this machine lacks).

    Raises:
        UnsupportedTensorError: an option re-layout cannot carry. PortabilityError: an unknown packer,
        or (XPU) a zero point that does not convert exactly. CorruptCheckpointError: parts and attributes disagree.
    """
    canon = source.to_canonical(parts, attrs, packer, allow_inexact)
    return target.from_canonical(canon, torch.device(build_on), allow_inexact)
