"""The load pipeline's entry points, and the one loop that runs it: plan -> fetch -> place -> build.

Every load goes through ``load_from``: ``load_quantized`` (one device), ``load_placed`` (a device per
name: device maps), ``aockpt.tp`` (a device and a ``Split`` per name), ``pack``/``unpack`` (the CPU).
Plan (``aockpt.plan``) checks every record and decides cuts and re-layouts; place gives each part a home:
a zero-copy view of the mapped file where the part goes whole to the CPU, else a slot in one allocation
per (shard, device) that the fetch stage (``aockpt.fetch``, through ``device_load``) fills, through
pinned staging buffers for GPUs, one strided read per chunk for a cut; build puts each tensor together through
its registry row, and ``codec.rebuild`` is the one place the device is set.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from . import codec, cuts, device_load, portability
from .errors import CorruptCheckpointError, KeyMismatchError, UsageError
from .fetch import THREADS
from .plan import Placement, TensorPlan, plan
from .progress import track
from .remote_sources import fetch_ahead
from .safetensors_io import sha256_hex
from .sources import Source, open_source

PathLike = str | os.PathLike
KeyFilter = Iterable[str] | Callable[[str], bool] | None
CPU = torch.device("cpu")


@dataclass(frozen=True)
class SliceInfo:
    """Where a local tensor sits in the full one, for writers that reassemble it (aockpt.dcp)."""

    full_shape: tuple[int, ...]
    full_attrs: dict[str, Any]
    local_shape: tuple[int, ...]  # the outer shape of the local tensor
    dim: int | None  # the outer dim it was cut along; None: the whole tensor
    parts: dict[str, tuple[int, int, int] | None] | None  # part -> (dim, start, full length); None: whole
    # parts is None for re-laid-out int4, whose local parts are not pieces of the stored ones


class Shards(dict):
    """name -> local tensor, as a rank holds it; ``slices[name]`` says where each sits in the full tensor.

    Pass it to ``aockpt.dcp.AockptSavePlanner(slices=...)`` / ``AockptLoadPlanner(slices=...)``: the
    positions travel with this value, not with the tensors, so copies of the tensors keep them."""

    def __init__(self, tensors: dict[str, torch.Tensor], slices: dict[str, SliceInfo]):
        super().__init__(tensors)
        self.slices = slices


@dataclass
class Built:
    """What a load made: tensors by asked-for name, the plan of each, and each stored tensor's packer."""

    tensors: dict[str, torch.Tensor]
    plans: dict[str, TensorPlan]  # by asked-for name (tied names share their target's plan)
    packers: dict[str, str | None]


def select(source: Source, keys: KeyFilter) -> list[str]:
    """Names to load; unknown names asked for are an error listing each one."""
    names = source.names
    if keys is None:
        return names
    if callable(keys):
        return [n for n in names if keys(n)]
    wanted = list(keys)
    missing = sorted(set(wanted) - set(names))
    if missing:
        raise KeyMismatchError(f"{source.path} has no tensor named {', '.join(missing[:10])}"
                               + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""))
    return wanted


def load_quantized(path: PathLike, device: str | torch.device = "cpu", *, relayout: bool = False,
                   keys: KeyFilter = None, verify: bool = False, cpu_packer: str | None = None,
                   shard: Any = None) -> dict[str, torch.Tensor]:
    """Load a checkpoint's tensors onto `device`, every tensor checked before any is built.

    Args:
        path: any input `pack` accepts.
        device: "cpu", "cuda", "cuda:1", a torch.device, ...
        relayout: re-pack device-pinned int4 exactly for `device` instead of refusing it.
        keys: names to load (a list), or a predicate on names; only those bytes are read.
        verify: also check every loaded tensor's stored parts against their recorded digests.
        cpu_packer: which CPU packer wrote int4 weights whose file does not say (as for `pack`).
        shard: an ``aockpt.TPShard`` (plan, rank, world size): load only this rank's slices
            (docs/distributed.md); the result is then a ``Shards`` mapping.
    Returns:
        name -> tensor (torchao subclasses rebuilt); tied names share one tensor.
    Raises:
        PortabilityError (naming every tensor that cannot live on `device`), CorruptCheckpointError,
        KeyMismatchError, UnsafeCheckpointError, UnsupportedTensorError, UsageError.
    """
    target = portability.parse_device(device)
    placement_of = shard.placement_of(target) if shard is not None else (lambda _: Placement(target))
    return load_placed(path, placement_of, relayout=relayout, keys=keys, verify=verify, cpu_packer=cpu_packer,
                       partial=shard is not None)


def load_placed(path: PathLike, placement_of: Callable[[str], Placement | torch.device], *, relayout: bool = False,
                keys: KeyFilter = None, verify: bool = False, cpu_packer: str | None = None,
                partial: bool = False) -> dict[str, torch.Tensor]:
    """`load_quantized` with each tensor placed on its own device (device maps), or cut (tensor parallelism);
    `partial`: cuts will read only some bytes (a Hub repo is then read by range, not downloaded)."""
    with open_source(path, cpu_packer, partial=partial or keys is not None) as source:
        names = select(source, keys)
        portability.require_known_packers({n: source.types[n] for n in source.real_names(names)}, str(source.path))
        placements = {n: _placement(placement_of(n)) for n in names}
        built = load_from(source, placements, relayout=relayout, verify=verify)
        return as_result(built)


def as_result(built: Built) -> dict[str, torch.Tensor]:
    """Whole tensors as a dict; where any name was cut, a ``Shards`` stating where every slice sits."""
    if all(p.cut is None for p in built.plans.values()):
        return built.tensors
    return Shards(built.tensors, {n: slice_info(p) for n, p in built.plans.items()})


def slice_info(p: TensorPlan) -> SliceInfo:
    """Where a planned tensor's local parts sit in the stored ones."""
    if p.cut is None:
        return SliceInfo(p.record.shape, p.record.attrs, p.record.shape, None, {k: None for k in p.record.parts})
    parts = None if p.canonical or p.converter else {
        k: None if span is None else (span[0], span[1], p.record.parts[k].shape[span[0]]) for k, span in p.spans.items()}
    local = tuple(p.cut.stop - p.cut.start if d == p.cut.dim else n for d, n in enumerate(p.record.shape))
    return SliceInfo(p.record.shape, p.record.attrs, local, p.cut.dim, parts)


def _placement(value: Placement | torch.device) -> Placement:
    """A placement from a device map's device or a full placement: the CPU as one device, a CUDA device this
    machine has with its index (so parts bound for "cuda" and "cuda:0" share one allocation)."""
    placement = value if isinstance(value, Placement) else Placement(value)
    device = placement.device
    if device.type == "cpu":  # one CPU: "cpu:0" as "cpu", or .to() would copy parts still being read
        return Placement(CPU, placement.split)
    if device.type != "cuda":
        return placement
    count = torch.cuda.device_count()
    index = device.index if device.index is not None else (torch.cuda.current_device() if count else None)
    if index is None or not 0 <= index < count:
        raise UsageError(f"{device} is not a device of this machine, which has {count} CUDA device(s); load onto "
                         f"{'cuda:0' if count else 'cpu'} instead")
    return Placement(torch.device("cuda", index), placement.split)


def load_from(source: Source, placements: dict[str, Placement], *, relayout: bool | None, verify: bool = False,
              rules_for: torch.device | None = None) -> Built:
    """The pipeline on an open source for the asked-for names (aliases included).

    `relayout` None builds every tensor exactly as stored; `rules_for` applies the device rules for that
    device while building on the placements' devices (``pack --device``)."""
    request_of = _requests(source, placements)
    plans = plan(source, {r: placements[r] for r in dict.fromkeys(request_of.values())}, relayout=relayout,
                 rules_for=rules_for)
    stored = list(dict.fromkeys(source.aliases.get(n, n) for n in plans))
    host = stored if verify else [source.aliases.get(r, r) for r, p in plans.items() if p.cut is None and
                                  (p.canonical or p.converter is not None or p.device.type == "cpu")]
    if not fetch_ahead(source, host, verify) and verify:  # remote: read concurrently, digests checked on arrival
        verify_digests(source, stored)
    parts, loading = _place(source, plans)
    try:
        tensors, packers = _build(source, plans, parts)
    except BaseException:
        if loading is not None:
            loading.cancel()
        raise
    if loading is not None:
        loading.wait()
    return Built({n: tensors[r] for n, r in request_of.items()}, {n: plans[r] for n, r in request_of.items()},
                 {source.aliases.get(r, r): packers[r] for r in plans})


def _requests(source: Source, placements: dict[str, Placement]) -> dict[str, str]:
    """Each asked-for name's request: the first name with its stored tensor and placement (tied names
    placed alike share one tensor)."""
    first: dict[tuple[str, Placement], str] = {}
    return {name: first.setdefault((source.aliases.get(name, name), placement), name)
            for name, placement in placements.items()}


def _place(source: Source, plans: dict[str, TensorPlan]) -> tuple[dict[tuple[str, str], torch.Tensor],
                                                                  device_load.Loading | None]:
    """Every planned part in its home: a mapped view where it goes whole to the CPU, or to a converter (which
    reads it at once, on the CPU), else a slot the fetch stage fills; in-memory sources are cut in memory."""
    ckpt = source.checkpoint
    parts: dict[tuple[str, str], torch.Tensor] = {}
    wants: dict[str, device_load.Want] = {}
    for request, p in plans.items():
        real = source.aliases.get(request, request)
        converted = p.canonical or p.converter is not None  # the build reads these bytes: no overlap
        in_memory = source.flat(real).parts if ckpt is None else {}
        for inner, span in ((inner, p.spans.get(inner)) for inner in p.record.parts):
            if ckpt is None:
                parts[(request, inner)] = in_memory[inner] if span is None else _narrow(in_memory[inner], span)
                continue
            key = ckpt.entries[real].parts[inner].key
            if converted or (p.device.type == "cpu" and span is None):
                view = ckpt.part(key)  # a view of the mapped file
                parts[(request, inner)] = view if span is None else _narrow(view, span)
                continue
            wants[f"{request}\x00{inner}"] = device_load.Want(ckpt.key_to_shard[key], key, p.device, span)
    if not wants:
        return parts, None
    loading = device_load.start_loading(ckpt.shards, wants)
    parts.update({tuple(k.split("\x00", 1)): v for k, v in loading.parts.items()})
    return parts, loading


def _narrow(part: torch.Tensor, span: cuts.Span) -> torch.Tensor:
    """An in-memory part's span, as its own tensor."""
    dim, start, stop = span
    return part.narrow(dim, start, stop - start).contiguous()


def _build(source: Source, plans: dict[str, TensorPlan], parts: dict[tuple[str, str], torch.Tensor]
           ) -> tuple[dict[str, torch.Tensor], dict[str, str | None]]:
    """Each planned tensor put together through its registry row, on its device; also each one's packer
    (the converter's where it re-packed). Constructors touch no bytes (tests/test_codec.py checks every
    registered type), so this overlaps the fetch."""
    built, packers = {}, {}
    for request, p in track(list(plans.items()), "loading", len(plans)):
        where = f"{source.path}: {request}"
        local = codec.FlatTensor(p.record.row, p.record.shape, p.record.dtype,
                                 {inner: parts[(request, inner)] for inner in p.record.parts}, p.record.attrs)
        packers[request] = p.packer
        if p.canonical:
            local, packers[request] = cuts.cut_canonical(request, local, p.cut, p.packer, p.device)
        elif p.cut is not None:
            local = cuts.local_record(p.record, p.cut, local.parts)
        if p.converter is not None:
            codec.check_record(local, where)
            local, packers[request] = p.converter(local, p.device)
        same = p.cut is None and p.converter is None  # the record plan.check_records checked, on the stored parts
        built[request] = codec.rebuild(local, where, p.device, checked=same)
    return built, packers


def verify_digests(source: Source, names: list[str]) -> list[str]:
    """Check recorded digests, several tensors at once (hashlib lets go of the GIL); raise one
    CorruptCheckpointError naming every tensor that changed."""
    if source.digests is None:
        raise CorruptCheckpointError(f"{source.path} was not packed by aockpt, so it records no digests to verify")

    def changed(name: str) -> list[str]:
        return [f"{name} (part {inner})" for inner, digest, data in source.digests(name) if sha256_hex(data) != digest]

    with ThreadPoolExecutor(THREADS, thread_name_prefix="aockpt-verify") as pool:
        bad = [part for found in track(pool.map(changed, names), "verifying", len(names)) for part in found]
    if bad:
        raise CorruptCheckpointError(
            f"{source.path}: {len(bad)} tensor part(s) do not match their recorded digest: {', '.join(bad[:10])}; "
            "the file was modified or damaged: re-download or re-pack it"
        )
    return names


def stored_bytes(path: PathLike, cpu_packer: str | None = None) -> dict[str, int]:
    """Bytes each tensor stores (tied names share their target's), read from headers alone."""
    with open_source(path, cpu_packer, partial=True) as source:
        sizes = {n: sum(p.numel() * p.element_size() for p in source.describe(n).parts.values()) for n in source.types}
        return {**sizes, **{a: sizes[t] for a, t in source.aliases.items()}}
