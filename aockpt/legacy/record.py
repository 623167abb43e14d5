"""The fields of a legacy AffineQuantizedTensor record, read from its inert stand-in and checked."""

from __future__ import annotations

from typing import Any

import torch

from .. import codec
from ..errors import CorruptCheckpointError
from .standins import ACTIVATION_CASTS, LegacyFunction, LegacyObject, LegacyTensor, Role, role_of


def read_field(rec: Any, key: str, kinds: type | tuple[type, ...], where: str) -> Any:
    """One attribute of a legacy record, checked to be of the type the old class always stored."""
    value = rec.legacy_state.get(key) if isinstance(rec, (LegacyTensor, LegacyObject)) else None
    if not isinstance(value, kinds) or (kinds is torch.Tensor and isinstance(value, LegacyTensor)):
        raise CorruptCheckpointError(
            f"{where}: the legacy {getattr(rec, 'legacy_name', type(rec).__name__)} has {key}="
            f"{type(value).__name__}, expected {getattr(kinds, '__name__', kinds)}; the file is corrupt"
        )
    return value


def plain_field(rec: Any, key: str, where: str) -> torch.Tensor:
    """A plain (storage-backed) inner tensor of a legacy record."""
    t = read_field(rec, key, torch.Tensor, where)
    if type(t) is not torch.Tensor:
        raise CorruptCheckpointError(f"{where}: the legacy {key} is a {type(t).__name__}, not a plain tensor")
    return t


def _optional_plain_field(rec: Any, key: str, where: str) -> torch.Tensor | None:
    """A plain inner tensor that the old class stored as None when unused."""
    return None if rec.legacy_state.get(key) is None else plain_field(rec, key, where)


class Weight:
    """The fields of a legacy AffineQuantizedTensor record that every migration reads."""

    def __init__(self, aqt: LegacyTensor, act: LegacyFunction | None, where: str,
                 act_kwargs: dict[str, Any] | None = None) -> None:
        self.where = where
        self.act_kwargs = act_kwargs or {}
        self.impl = read_field(aqt, "tensor_impl", LegacyTensor, where)
        if role_of(self.impl) is not Role.IMPL:
            raise CorruptCheckpointError(f"{where}: tensor_impl is a {type(self.impl).__name__}, not a layout impl")
        self.layout = self.impl.legacy_state.get("_layout")
        self.block_size = list(read_field(aqt, "block_size", (tuple, list), where))
        if not all(type(b) is int and b > 0 for b in self.block_size) or len(self.block_size) != aqt.dim():
            raise CorruptCheckpointError(f"{where}: block_size {self.block_size} does not fit shape {tuple(aqt.shape)}")
        self.shape = list(aqt.shape)
        stored = sum(t.numel() * t.element_size() for t in self.impl.legacy_state.values() if isinstance(t, torch.Tensor))
        if _numel(self.shape) > 8 * stored:  # no layout stores less than one bit per value
            raise CorruptCheckpointError(
                f"{where}: a {self.shape} weight cannot be held in the {stored} bytes its record stores; the "
                "file is corrupt or crafted (refused before allocating anything for it)"
            )
        self.dtype = aqt.dtype
        self.quant_range = (aqt.legacy_state.get("quant_min"), aqt.legacy_state.get("quant_max"))
        self.zero_domain = aqt.legacy_state.get("zero_point_domain")
        act_name = act.legacy_name.rsplit(".", 1)[1] if act is not None else None
        self.act = None if act_name in ACTIVATION_CASTS else act_name

    def blocks(self) -> list[int]:
        """The scale/zero-point shape with one entry per block (the keepdim form torchao 0.18 uses)."""
        return [s // b for s, b in zip(self.shape, self.block_size)]

    def tensor(self, key: str) -> torch.Tensor:
        return plain_field(self.impl, key, self.where)

    def optional(self, key: str) -> torch.Tensor | None:
        return _optional_plain_field(self.impl, key, self.where)

    def per_block(self, t: torch.Tensor, key: str) -> torch.Tensor:
        """A scale or zero point reshaped to one value per block (values untouched)."""
        if t.numel() != _numel(self.blocks()):
            raise CorruptCheckpointError(
                f"{self.where}: {key} has {t.numel()} values for {self.blocks()} blocks; the file is corrupt"
            )
        return t.reshape(self.blocks())


def checked(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """A migrated tensor held to the rules of every record aockpt reads (part names and dtypes, int4 geometry,
    part sizes against the outer shape): torchao's constructors store junk fields unchecked, and a kernel
    would read past them only when the weight is used."""
    return codec.rebuild(codec.flatten(where, tensor), where)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
