"""One row of the registry (aockpt/registry.py): the ``TensorType`` record and the vocabulary its fields use.

A row states every per-type fact and checks its own consistency when it is written (``__post_init__``);
the table of rows, and every lookup, live in the registry.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import part_sizes
from .relayout import Converter


class Portability(str, enum.Enum):
    """Whether a tensor's bytes mean the same thing on every device."""

    PORTABLE = "portable"  # plain layout: moving the bytes to another device is exact
    PINNED = "pinned"  # packed for one device's kernel: another device needs a re-layout


class Family(str, enum.Enum):
    """The kind of quantization a type stores (README type table)."""

    PLAIN = "plain"
    INT8 = "int8"
    FLOAT8 = "float8"
    INTX = "intx"
    INT4 = "int4"
    MX = "mx"
    NVFP4 = "nvfp4"
    NF4 = "nf4"


class Device(str, enum.Enum):
    """Device types aockpt knows (torch.device(...).type)."""

    CPU = "cpu"
    CUDA = "cuda"
    XPU = "xpu"
    NPU = "npu"
    MPS = "mps"


class Along(str, enum.Enum):
    """How a part follows one outer dimension when a tensor is split for tensor parallelism."""

    VALUES = "values"  # one stored element per 1, 2 or 8 values (the ratio is read from the shapes)
    BLOCKS = "blocks"  # one stored element per quantization block along that dimension


class TpSplit(str, enum.Enum):
    """How a rank's slice of a tensor is read (see aockpt/tp.py and docs/distributed.md)."""

    DIRECT = "direct"  # only the slice's bytes are asked for: rows/columns of each part
    RELAYOUT = "relayout"  # device-packed int4: the whole tensor is read, sliced in its exact canonical form, re-packed
    NONE = "none"  # not split: the layout keeps no row/column structure aockpt can cut exactly


# part -> (part dim, how it follows) for outer dim 0 (rows, colwise split) and outer dim 1 (columns, rowwise)
TpAxes = tuple[tuple[str, tuple[int, Along] | None, tuple[int, Along] | None], ...]
Names = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]  # required parts, optional parts, attributes

# Outer dtypes a quantized tensor dequantizes to, and the dtype names its float parts may take.
OUTER_DTYPES = frozenset({"float32", "bfloat16", "float16"})


def _torchao_parts(tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A torchao subclass's inner tensors and attributes, by its own ``__tensor_flatten__``."""
    names, attrs = tensor.__tensor_flatten__()
    return {n: getattr(tensor, n) for n in names}, dict(attrs)


def _torchao_build(cls: type, parts: dict[str, torch.Tensor], attrs: dict[str, Any],
                   shape: torch.Size | None) -> torch.Tensor:
    """A torchao subclass put back together by its own ``__tensor_unflatten__``."""
    return cls.__tensor_unflatten__(parts, attrs, shape, None)


@dataclass(frozen=True, kw_only=True)
class TensorType:
    """One tensor type as aockpt sees it: every per-type fact lives here; a row checks its own consistency."""

    name: str  # stable on-disk name (torchao's `_type`)
    cls: type
    family: Family
    portability: Portability
    packed_for: Device | None  # device type whose kernel the bytes are packed for (pinned only)
    kernels: frozenset[str]  # device types where torch/torchao 0.18 has a matmul kernel for it
    stock_loadable: bool  # stock transformers 5 + torchao 0.18 can read it from safetensors
    note: str
    names: Names | None = None  # see inner_names
    tp: tuple[TpSplit, TpSplit] = (TpSplit.NONE, TpSplit.NONE)  # splitting the rows (colwise), the columns (rowwise)
    tp_axes: TpAxes = ()  # for DIRECT: where each part keeps the outer rows and columns
    # part -> dtype names it may be stored as (checked before any constructor or converter reads it);
    # parts not listed are unchecked
    part_dtypes: dict[str, frozenset[str]] = field(default_factory=dict, hash=False, compare=False)
    config: Callable[[Any], Any] | None = None  # tensor -> the torchao 0.18 config that makes it, None if none does
    weights_only: bool = True  # torch.load(weights_only=True) rebuilds it after a plain `import torchao`
    part_rules: part_sizes.Rules = field(default_factory=dict, hash=False, compare=False)  # part sizes vs shape
    geometry: part_sizes.Int4Geometry | None = None  # int4: shape, block size and exact part shapes
    outer_dtypes: frozenset[str] | None = OUTER_DTYPES  # dtypes the tensor may have; None: any storable one
    relayout: Converter | None = None  # exact int4 re-layout through the canonical form
    packer_here: Callable[[], str] | None = None  # pinned: the packer this process's kernel writes and reads
    assumed_packer: str | None = None  # pinned: the packer to assume where a file does not record one
    former_names: tuple[str, ...] = ()  # dotted names torchao 0.13-0.17 pickled the class under
    own_key: bool = False  # its one part is stored under the tensor's own name (torchao's plain convention)
    parts_of: Callable[[torch.Tensor], tuple[dict[str, torch.Tensor], dict[str, Any]]] = _torchao_parts
    build: Callable[[type, dict[str, torch.Tensor], dict[str, Any], torch.Size | None], torch.Tensor] = _torchao_build

    def __post_init__(self) -> None:
        problems = []
        required = self.inner_names()[0] if self.names is not None or hasattr(self.cls, "tensor_data_names") else ()
        for dim, split in enumerate(self.tp):
            covered = {part for part, *axes in self.tp_axes if axes[dim] is not None}
            if split is TpSplit.DIRECT and not set(required) <= covered:
                problems.append(f"a direct split of dim {dim} must say how parts {sorted(set(required) - covered)} "
                                "follow it (tp_axes)")
            if split is TpSplit.RELAYOUT and self.relayout is None:
                problems.append(f"a relayout split of dim {dim} needs a converter (relayout=)")
        if self.portability is Portability.PINNED and (self.packed_for is None or self.packer_here is None):
            problems.append("a pinned type must say which device it is packed for and which packer this process "
                            "uses (packed_for=, packer_here=)")
        if problems:
            raise TypeError(f"registry row {self.name}: {'; '.join(problems)}")

    @property
    def quantized(self) -> bool:
        """Whether it is a torchao subclass (anything but the plain tensor row)."""
        return self.family is not Family.PLAIN

    def tp_text(self) -> str:
        """How tensor parallelism splits this type, as `inspect` says it: one word, or rows then columns."""
        rows, cols = self.tp
        return rows.value if rows is cols else f"{rows.value} rows, {cols.value} cols"

    def inner_names(self) -> Names:
        """(required parts, optional parts, attributes), from torchao's class conventions unless overridden."""
        if self.names is not None:
            return self.names
        cls = self.cls
        return (
            tuple(cls.tensor_data_names),
            tuple(getattr(cls, "optional_tensor_data_names", None) or ()),
            tuple(cls.tensor_attribute_names) + tuple(getattr(cls, "optional_tensor_attribute_names", None) or ()),
        )
