"""What a checkpoint holds and whether it is whole: ``inspect`` (the report model) and ``verify``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from . import portability
from .config_rules import Backing
from .foreign import Foreign
from .hf_config import CONFIG_NAME, StockVerdict, read_config, stock_verdict
from .load import PathLike, verify_digests
from .plan import check_records
from .reader import check_torchao_records
from .registry import DTYPE_NAMES, tensor_type_named
from .remote_sources import fetch_ahead
from .sources import Source, open_source


@dataclass
class TensorInfo:
    """One tensor as `inspect` reports it."""

    name: str
    type: str
    shape: list[int]
    dtype: str
    nbytes: int
    device: str
    portability: str
    packer: str | None
    alias_of: str | None = None
    devices: dict[str, portability.Verdict] = field(default_factory=dict)  # device -> will it load and run
    origin: str | None = None  # for a migrated legacy tensor: what it was and what it became
    packer_candidates: list[str] = field(default_factory=list)  # unknown CPU int4 packer: who may have packed it
    tp: str = "direct"  # how tensor parallelism splits it: direct | relayout | none (registry TensorType.tp)


@dataclass
class CheckpointInfo:
    """What a checkpoint holds, per tensor and in total."""

    path: str
    kind: str
    format_version: str | None
    producer: dict[str, str]
    tensors: list[TensorInfo]
    stock: StockVerdict | None = None  # what stock from_pretrained does with a model folder
    foreign: Foreign | None = None  # quantized by another library: method, format, its tensors (aockpt.foreign)

    @property
    def total_bytes(self) -> int:
        """Bytes of stored tensor data (aliases counted once)."""
        return sum(t.nbytes for t in self.tensors if t.alias_of is None)

    @property
    def bf16_bytes(self) -> int:
        """What the same tensors would take as plain bf16, the usual unquantized baseline."""
        return sum(2 * _numel(t.shape) for t in self.tensors if t.alias_of is None)

    @property
    def not_stock_loadable(self) -> list[str]:
        """Types here that stock transformers 5 + torchao 0.18 cannot read from safetensors (registry table)."""
        return sorted({t.type for t in self.tensors if not tensor_type_named(t.type, t.name).stock_loadable})

    @property
    def not_unpackable(self) -> list[str]:
        """Types here that ``aockpt unpack`` refuses: torch.load(weights_only=True) cannot read them (registry)."""
        return sorted({t.type for t in self.tensors if not tensor_type_named(t.type, t.name).weights_only})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, as `aockpt inspect --json` prints it."""
        out = asdict(self)
        for t, row in zip(self.tensors, out["tensors"]):
            row["devices"] = {d: v.text() for d, v in t.devices.items()}
        out.update(total_bytes=self.total_bytes, bf16_bytes=self.bf16_bytes, not_stock_loadable=self.not_stock_loadable,
                   not_unpackable=self.not_unpackable)
        return out


def _numel(shape: list[int]) -> int:
    """Elements in a shape."""
    n = 1
    for d in shape:
        n *= d
    return n


def inspect(path: PathLike, *, devices: Iterable[str] = (), cpu_packer: str | None = None) -> CheckpointInfo:
    """Describe a checkpoint without loading it onto any device; `devices` adds a will-it-run verdict each.

    A CPU int4 tensor whose packer neither the file nor `cpu_packer` states lists its `packer_candidates`.
    """
    with open_source(path, cpu_packer, foreign_ok=True, partial=True) as source:
        ckpt = source.checkpoint
        tensors = []
        for name, (row, packer) in source.types.items():
            flat = source.describe(name)
            if flat.shape is None:  # a foreign record: its outer shape is learnt by rebuilding it (shapes only)
                flat = check_records(source, [name])[name]
            verdicts = {d: portability.verdict(row, packer, portability.parse_device(d).type) for d in devices}
            tensors.append(TensorInfo(name, row.name, list(flat.shape), DTYPE_NAMES[flat.dtype], flat.nbytes,
                                      source.made_on[name], row.portability.value, packer, None, verdicts,
                                      source.origins.get(name), portability.packer_candidates(row, packer),
                                      row.tp_text()))
        by_name = {t.name: t for t in tensors}
        for alias, target in source.aliases.items():
            t = by_name[target]
            tensors.append(TensorInfo(alias, t.type, t.shape, t.dtype, 0, t.device, t.portability, t.packer,
                                      target, t.devices, None, t.packer_candidates, t.tp))
        producer = ckpt.producer if ckpt else {}
        return CheckpointInfo(str(path), source.kind, ckpt.format_version if ckpt else None, producer, tensors,
                              _stock(source), source.foreign)


def _stock(source: Source) -> StockVerdict | None:
    """For a model folder, what stock from_pretrained does with it; None for anything else."""
    config = next((f for f in source.extra_files if f.name == CONFIG_NAME), None)
    if config is None:
        return None
    types = {n: kind.row for n, kind in source.types.items()}
    return stock_verdict(read_config(config), types, legacy=bool(source.origins),
                         backing=Backing.of_source(source), path=config)


@dataclass
class VerifyReport:
    """A successful verification."""

    path: str
    tensors: int
    bytes: int


def verify(path: PathLike) -> VerifyReport:
    """Check structure, every digest, and that torchao's records agree with aockpt's; name what is wrong."""
    with open_source(path) as source:
        names = list(source.types)
        fetch_ahead(source, names, verify=True)  # a remote source: every byte read concurrently, hashed on arrival
        verify_digests(source, names)
        check_records(source, names)
        check_torchao_records(source.checkpoint)
        total = sum(sum(len(d) for _, _, d in source.digests(n)) for n in names)
        return VerifyReport(str(path), len(names) + len(source.aliases), total)
