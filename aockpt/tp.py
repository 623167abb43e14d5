"""Tensor parallelism's vocabulary for the one load pipeline: each rank loads only its rows or columns.

A plan maps module-name patterns to a split in the vocabulary of torch's tensor parallelism
(``ColwiseParallel`` / ``RowwiseParallel`` or the strings "colwise" / "rowwise", plus "vocab" for an
embedding split over its vocabulary and "replicate"); ``TPShard.placement_of`` turns it into a
``plan.Split`` per name, and ``load_quantized`` does the rest (the registry says how each part follows the
outer rows and columns, so a rank reads only its slice of ``qdata`` and the matching scales). Slices
follow torch's ``Shard`` chunking, so ``load_dtensors`` wraps them into ``DTensor.from_local`` unchanged.
See docs/distributed.md.
"""

from __future__ import annotations

import enum
import fnmatch
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

from .errors import UnsupportedTensorError, UsageError
from .load import Shards, load_quantized
from .plan import Placement, Split


class Style(str, enum.Enum):
    """How one module's weight is split across ranks."""

    COLWISE = "colwise"  # output features: weight rows (torch ColwiseParallel on nn.Linear), bias too
    ROWWISE = "rowwise"  # input features: weight columns (torch RowwiseParallel on nn.Linear), bias replicated
    VOCAB = "vocab"  # an embedding's rows (torch RowwiseParallel on nn.Embedding)
    REPLICATE = "replicate"  # every rank loads the whole tensor


# style -> parameter name -> outer dim it is split along (absent: replicated)
_SPLIT_DIMS: dict[Style, dict[str, int]] = {
    Style.COLWISE: {"weight": 0, "bias": 0},
    Style.ROWWISE: {"weight": 1},
    Style.VOCAB: {"weight": 0},
    Style.REPLICATE: {},
}
_TORCH_STYLES = {"ColwiseParallel": Style.COLWISE, "RowwiseParallel": Style.ROWWISE}


@dataclass(frozen=True)
class TPShard:
    """One rank's place in a tensor-parallel group, and the plan it loads with."""

    plan: Mapping[str, Any]  # module-name pattern -> Style, its string, or a torch ParallelStyle
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if not (_index(self.world_size) and self.world_size > 0 and _index(self.rank) and
                0 <= self.rank < self.world_size):
            raise UsageError(f"tensor-parallel rank {self.rank!r} / world size {self.world_size!r} is not valid; "
                             "need whole numbers with 0 <= rank < world_size")
        if not isinstance(self.plan, Mapping) or not all(isinstance(p, str) for p in self.plan):
            raise UsageError(f"a tensor-parallel plan maps module-name patterns to styles, not "
                             f"{type(self.plan).__name__}; e.g. {{\"mlp.down_proj\": \"rowwise\"}}")
        for pattern, value in self.plan.items():
            style_of(value, pattern)

    def placement_of(self, device: torch.device) -> Callable[[str], Placement]:
        """Each name's placement on `device`: this rank's split of it under the plan, or whole."""

        def placement(name: str) -> Placement:
            dim = split_dim(name, self.plan)
            if dim is None:
                return Placement(device)
            return Placement(device, Split(dim, self.rank, self.world_size, ("colwise/vocab", "rowwise")[dim]))

        return placement


def _index(value: Any) -> bool:
    """A whole number (bools and floats excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


def style_of(value: Any, pattern: str) -> Style:
    """A plan value as a Style: a Style, its string, or torch's ColwiseParallel / RowwiseParallel object."""
    if isinstance(value, str):
        try:
            return Style(value)
        except ValueError:
            pass
    else:
        for klass in type(value).__mro__:
            if klass.__module__.startswith("torch.distributed") and klass.__name__ in _TORCH_STYLES:
                return _TORCH_STYLES[klass.__name__]
    raise UsageError(f"tensor-parallel plan entry {pattern!r} has style {value!r}; use one of "
                     f"{', '.join(s.value for s in Style)} or torch's ColwiseParallel / RowwiseParallel")


def _matches(pattern: str, module: str) -> bool:
    """torch's rule: the pattern and the module name match atom by atom (``*`` within one atom)."""
    atoms, names = pattern.split("."), module.split(".")
    return len(atoms) == len(names) and all(fnmatch.fnmatchcase(n, a) for a, n in zip(atoms, names))


def split_dim(name: str, plan: Mapping[str, Any]) -> int | None:
    """The outer dim a parameter is split along under `plan`, None when it is replicated."""
    module, _, param = name.rpartition(".")
    styles = {style_of(v, p) for p, v in plan.items() if _matches(p, module)}
    if len(styles) > 1:
        found = ", ".join(sorted(s.value for s in styles))
        raise UsageError(f"{name} matches plan patterns with different styles ({found}); make the patterns disjoint")
    return _SPLIT_DIMS[styles.pop()].get(param) if styles else None


def load_shard(path: str | os.PathLike, device: str | torch.device = "cpu", *, shard: TPShard,
               keys: Iterable[str] | Callable[[str], bool] | None = None, relayout: bool = False) -> Shards:
    """This rank's local tensors, reading only its slices' bytes: ``load_quantized(..., shard=shard)``.

    Returns a ``Shards`` mapping: name -> local tensor, and ``.slices`` saying where each sits in the full
    tensor (what ``aockpt.dcp`` planners need). Every option of load_quantized applies."""
    return load_quantized(path, device, shard=shard, keys=keys, relayout=relayout)


def load_dtensors(path: str | os.PathLike, mesh: Any, plan: Mapping[str, Any], *,
                  keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """This rank's slices wrapped as DTensors on a 1-D device mesh with the plan's placements.

    torchao 0.18 lets Float8Tensor and NVFP4Tensor live inside a DTensor; Int8Tensor, IntxUnpackedToInt8Tensor
    and the int4 types do not (``aten.view`` is not implemented): those are refused by name, and
    load_shard gives the same slices as plain local tensors (docs/distributed.md).
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    shard = TPShard(plan, mesh.get_local_rank(), mesh.size())
    device = torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device()) \
        if mesh.device_type != "cpu" else torch.device("cpu")
    local = load_shard(path, device, shard=shard, keys=keys)
    out = {}
    for name, tensor in local.items():
        where = local.slices[name]
        placement = Replicate() if where.dim is None else Shard(where.dim)
        stride = torch.empty(where.full_shape, device="meta").stride()
        try:
            out[name] = DTensor.from_local(tensor, mesh, [placement], run_check=False,
                                           shape=torch.Size(where.full_shape), stride=stride)
        except NotImplementedError as e:
            op = re.search(r"op='([^']+)'", str(e))
            raise UnsupportedTensorError(
                f"{name}: torchao's {type(tensor).__name__} cannot be wrapped in a DTensor (torchao does not "
                f"implement {op.group(1) if op else 'an op DTensor needs'} for it); use aockpt.tp.load_shard for "
                "plain local tensors") from e
    return out
