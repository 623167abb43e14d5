"""Plan stage of the load pipeline (plan -> fetch -> place -> build): what each asked-for tensor needs.

Pure: from names, a ``Placement`` each (a device, and an optional ``Split`` of one outer dim) and the
records, it decides, touching no tensor byte, what every tensor will be: its whole record checked
against the stored shapes (``codec.rebuild`` on shape-only parts: every check the build makes), the span
of each part a cut reads (``cuts``), and the exact re-layout a device needs (``portability``). Every
record of every caller (whole loads, device maps, tensor-parallel slices, DCP, ``verify``) is checked
here, in ``check_records``, and one error names every offending tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import codec, cuts, portability
from .errors import AockptError, CorruptCheckpointError, PortabilityError, UnsupportedTensorError
from .registry import TpSplit
from .sources import Source


@dataclass(frozen=True)
class Split:
    """One outer dim split across `world` ranks as torch's ``Shard`` chunks it; this rank is `rank`."""

    dim: int
    rank: int
    world: int
    style: str = "split"

    def cut(self, size: int) -> cuts.Cut:
        """This rank's [start, stop) of a dim of `size` (ceil-sized chunks, the last ones short or empty)."""
        full = -(-size // self.world)
        start = min(self.rank * full, size)
        return cuts.Cut(self.dim, start, min(start + full, size), size, self.style)


@dataclass(frozen=True)
class Placement:
    """Where one tensor goes: a device, and the split of it this process holds (None: whole)."""

    device: torch.device
    split: Split | None = None


@dataclass
class TensorPlan:
    """One stored tensor's plan: its checked record (shape-only parts), its cut and how it is made."""

    name: str
    record: codec.FlatTensor  # the whole record; parts are shape-only (meta) tensors
    device: torch.device
    packer: str | None
    cut: cuts.Cut | None = None
    spans: dict[str, cuts.Span | None] = field(default_factory=dict)  # part -> span it reads (None: whole)
    canonical: bool = False  # device-packed int4: parts read whole, the slice cut in canonical form
    converter: portability.Converter | None = None


def check_records(source: Source, names: list[str]) -> dict[str, codec.FlatTensor]:
    """Every record checked against its stored shapes, with its outer shape known; one error names every bad one."""
    out, bad = {}, {}
    verdicts: dict[tuple, tuple[tuple[int, ...], torch.dtype]] = {}
    for name in names:
        try:
            out[name] = _checked(source, name, verdicts)
        except AockptError as e:
            bad[name] = e
    raise_all(bad)
    return out


def _checked(source: Source, name: str, verdicts: dict[tuple, tuple[tuple[int, ...], torch.dtype]]
             ) -> codec.FlatTensor:
    """One record rebuilt on shape-only parts (no byte is read), so its outer shape and dtype are known; a
    record alike one already rebuilt (a model's layers repeat a few) takes its verdict, as the rebuild would."""
    record = source.describe(name)
    key = _signature(record)
    if key not in verdicts:
        full = codec.rebuild(record, f"{source.path}: {name}")
        verdicts[key] = (tuple(full.shape), full.dtype)
    shape, dtype = verdicts[key]
    return codec.FlatTensor(record.row, shape, dtype, record.parts, record.attrs)


def _signature(record: codec.FlatTensor) -> tuple:
    """All a shape-only rebuild reads: the row, the declared shape and dtype, each part's shape and dtype,
    the attributes (their repr tells 1 from True from 1.0, lists from tuples, enums from strings)."""
    return (record.row, record.shape, record.dtype, repr(record.attrs),
            tuple((k, tuple(p.shape), p.dtype) for k, p in record.parts.items()))


def raise_all(bad: dict[str, AockptError]) -> None:
    """Raise one error of the first one's class naming every offending tensor (nothing when none)."""
    if not bad:
        return
    (first, error), *rest = bad.items()
    if not rest:
        raise error
    others = ", ".join(n for n, _ in rest[:10]) + (f" and {len(rest) - 10} more" if len(rest) > 10 else "")
    raise type(error)(f"{error} (also wrong: {others})") from error


def plan(source: Source, placements: dict[str, Placement], *, relayout: bool | None,
         rules_for: torch.device | None = None) -> dict[str, TensorPlan]:
    """Plans for names (a tied name stands for its target); `relayout` None skips the device rules (tensors
    exactly as stored); `rules_for` applies them for that device instead of each placement's."""
    records = check_records(source, list(dict.fromkeys(source.aliases.get(n, n) for n in placements)))
    plans, bad = {}, {}
    for name, placement in placements.items():
        try:
            real = source.aliases.get(name, name)
            plans[name] = _plan_one(name, records[real], source.types[real].packer, placement)
        except (UnsupportedTensorError, CorruptCheckpointError) as e:
            bad[name] = e
    raise_all(bad)
    if relayout is not None:
        _device_rules(plans, relayout, rules_for)
    return plans


def _plan_one(name: str, record: codec.FlatTensor, packer: str | None, placement: Placement) -> TensorPlan:
    """One tensor's cut: the span of each part it reads, or a canonical-form cut, or a refusal naming it."""
    out = TensorPlan(name, record, placement.device, packer)
    split = placement.split
    if split is None or split.dim >= len(record.shape):  # e.g. a bias under a rowwise split: replicated
        return out
    out.cut = split.cut(record.shape[split.dim])
    how = record.row.tp[split.dim]
    if how is TpSplit.DIRECT:
        out.spans = cuts.part_spans(name, record, out.cut)
    elif how is TpSplit.RELAYOUT:
        cuts.check_canonical_cut(name, record, out.cut)
        out.canonical = True
    else:
        raise cuts.refusal(name, out.cut, record, f"is not supported ({record.row.note}: the layout cannot be cut "
                           "exactly)", "leave it out of the plan to load it whole on every rank")
    return out


def _device_rules(plans: dict[str, TensorPlan], relayout: bool, rules_for: torch.device | None) -> None:
    """load_quantized's device rules for every tensor, per device: a converter each, or one error naming all."""
    by_device: dict[torch.device, dict[str, portability.TensorKind]] = {}
    for name, p in plans.items():
        by_device.setdefault(rules_for or p.device, {})[name] = portability.TensorKind(p.record.row, p.packer)
    stuck = []
    for device, kinds in by_device.items():
        try:
            for name, converter in portability.plan_loading(kinds, device, relayout=relayout).items():
                plans[name].converter = converter
        except PortabilityError as e:
            stuck.append(e)
    if stuck:
        raise stuck[0] if len(stuck) == 1 else PortabilityError("; ".join(str(e) for e in stuck))
