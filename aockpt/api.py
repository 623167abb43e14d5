"""The public operations: pack, save, unpack, load_quantized, inspect, verify."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from . import codec, device_load, portability
from .atomic import staged
from .errors import CorruptCheckpointError, KeyMismatchError, OutputError, UnsupportedTensorError, UsageError
from .config_rules import Backing
from .foreign import Foreign
from .hf_config import CONFIG_NAME, StockVerdict, read_config, rewritten_config, stock_verdict
from .reader import check_torchao_records, read_flat
from .progress import track
from .registry import DTYPE_NAMES, tensor_type_named
from .safetensors_io import sha256_hex
from .filenames import PICKLE_SUFFIXES, PICKLE_WEIGHTS
from .sources import Source, from_state_dict, merge_stored_ties, open_source
from .writer import SourceTensor, write_packed

PathLike = str | os.PathLike
KeyFilter = Iterable[str] | Callable[[str], bool] | None


_CPU = torch.device("cpu")


def _source_tensors(source: Source, layout_for: torch.device | None = None) -> list[SourceTensor]:
    """Rebuild every tensor of a source on CPU (zero-copy where the source allows), aliases sharing one object.

    With `layout_for`, pinned int4 tensors are re-laid out exactly for that device's kernel first.
    """
    portability.require_known_packers(source.types, str(source.path))
    converters = portability.plan_loading(source.types, layout_for, relayout=True) if layout_for else {}
    tensors, packers = _build(source, source.names, lambda _: _CPU, converters)
    return [SourceTensor(n, tensors[n], source.made_on[t], packers[t])
            for n, t in ((n, source.aliases.get(n, n)) for n in source.names)]


def pack(src: PathLike, dst: PathLike, *, force: bool = False, max_shard_size: int | str | None = None,
         workers: int = 1, device: str | torch.device | None = None, cpu_packer: str | None = None) -> Path:
    """Convert any supported checkpoint into a packed folder at `dst`, atomically.

    Args:
        src: a torch pickle state dict (.pt/.bin), a model folder, or a packed/torchao safetensors checkpoint.
        dst: the folder to create; it must be missing or an empty folder unless `force`.
        max_shard_size: largest shard, as bytes or "5GB"-style text (huggingface_hub's rule).
        workers: processes writing shards in parallel; the output is byte-identical for any value.
        device: re-lay out device-pinned int4 exactly for this device's kernel ("cpu", "cuda", "xpu").
        cpu_packer: which CPU packer wrote int4 weights whose file does not say ("cpu-avx512",
            "cpu-avx2", "cpu-default", or "native" for this machine's); see docs/portability.md.
    Returns:
        The destination path.
    Raises:
        UnsafeCheckpointError, CorruptCheckpointError, UnsupportedTensorError, UsageError,
        PortabilityError (CPU int4 of an unknown packer, and no `cpu_packer`).
    """
    layout_for = portability.parse_device(device) if device else None
    with open_source(src, cpu_packer) as source, staged(dst, force=force, source=src) as tmp:
        merge_stored_ties(source)
        items = _source_tensors(source, layout_for)
        write_packed(items, tmp, max_shard_size=max_shard_size, workers=workers, release_pages=True)
        _copy_extra_files(source, tmp, {i.name: i.tensor for i in items})
    return Path(dst)


def _copy_extra_files(source: Source, dst: Path, state: dict[str, torch.Tensor]) -> None:
    """Carry a folder's other files over unchanged, except config.json, made truthful for the tensors written."""
    for extra in source.extra_files:
        text = rewritten_config(extra, state, source.aliases) if extra.name == CONFIG_NAME else None
        if text is None:
            shutil.copy2(extra, dst / extra.name)
        else:
            (dst / extra.name).write_text(text)


def state_items(state_dict: dict[str, torch.Tensor]) -> list[SourceTensor]:
    """An in-memory state dict as writer items, recording this machine's packer for pinned layouts."""
    source = from_state_dict(state_dict, Path("<state_dict>"), "state dict")
    items = []
    for name in source.names:
        kind = source.types[source.aliases.get(name, name)]
        tensor = state_dict[name]
        items.append(SourceTensor(name, tensor, tensor.device.type,
                                  portability.packer_here(kind.type) or kind.packer))
    return items


def save(state_dict: dict[str, torch.Tensor], dst: PathLike, *, force: bool = False,
         max_shard_size: int | str | None = None, workers: int = 1) -> Path:
    """Pack an in-memory state dict (e.g. ``model.state_dict()`` after ``quantize_``) into a folder."""
    with staged(dst, force=force) as tmp:
        write_packed(state_items(state_dict), tmp, max_shard_size=max_shard_size, workers=workers)
    return Path(dst)


def unpack(src: PathLike, dst: PathLike, *, force: bool = False, cpu_packer: str | None = None) -> Path:
    """Write a checkpoint back as a torch pickle state dict that ``torch.load(weights_only=True)`` reads.

    A model folder unpacks into a folder (``pytorch_model.bin`` plus its other files) unless `dst` names
    a pickle file (``.pt``, ``.bin``, ...); anything else unpacks into the single file `dst`.
    `cpu_packer` is as for `pack`.
    """
    with open_source(src, cpu_packer) as source:
        portability.require_known_packers(source.types, str(source.path))
        _check_weights_only_loadable(source)
        as_folder = bool(source.extra_files) and Path(dst).suffix not in PICKLE_SUFFIXES
        with staged(dst, force=force, folder=as_folder, source=src) as tmp:
            state, _ = _build(source, source.names, lambda _: _CPU, {})
            _torch_save(state, tmp / PICKLE_WEIGHTS if as_folder else tmp, Path(dst))
            for extra in source.extra_files if as_folder else ():
                shutil.copy2(extra, tmp / extra.name)
    return Path(dst)


def _check_weights_only_loadable(source: Source) -> None:
    """Refuse to unpack tensor types that ``torch.load(weights_only=True)`` refuses even after ``import torchao``."""
    refused = sorted({k.type for k in source.types.values() if not tensor_type_named(k.type, k.type).weights_only})
    if refused:
        raise UnsupportedTensorError(
            f"{source.path} holds {', '.join(refused)}, which torch.load(weights_only=True) refuses even after "
            "import torchao, so an unpacked pickle would not load; keep the packed folder and load it with "
            "aockpt.load_quantized or aockpt.load_pretrained"
        )


def _torch_save(state: dict[str, torch.Tensor], path: Path, dst: Path) -> None:
    """torch.save, with its cryptic write failures (a full disk reads "unexpected pos") in the user's words."""
    try:
        torch.save(state, path)
    except (RuntimeError, OSError) as e:
        raise OutputError(f"could not write {dst} ({str(e).splitlines()[0]}); check free space and "
                          "permissions; nothing was written") from e


def _select(source: Source, keys: KeyFilter) -> list[str]:
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
        verify: also check every loaded part against its recorded digest.
        cpu_packer: which CPU packer wrote int4 weights whose file does not say (as for `pack`).
        shard: an ``aockpt.TPShard`` (plan, rank, world size): load only this rank's slices of a
            safetensors checkpoint (docs/distributed.md).
    Returns:
        name -> tensor (torchao subclasses rebuilt); tied names share one tensor.
    Raises:
        PortabilityError (naming every tensor that cannot live on `device`), CorruptCheckpointError,
        KeyMismatchError, UnsafeCheckpointError, UnsupportedTensorError.
    """
    if shard is not None:
        from . import tp

        if verify:
            raise UsageError("verify=True checks whole tensors, and a shard reads slices; run aockpt.verify(path) "
                             "once, then load the shards")
        return tp.load_shard(path, device, shard=shard, keys=keys, relayout=relayout)
    target = portability.parse_device(device)
    return load_placed(path, lambda _: target, relayout=relayout, keys=keys, verify=verify, cpu_packer=cpu_packer)


def load_placed(path: PathLike, device_of: Callable[[str], torch.device], *, relayout: bool = False,
                keys: KeyFilter = None, verify: bool = False, cpu_packer: str | None = None) -> dict[str, torch.Tensor]:
    """`load_quantized` with each tensor read straight onto its own device, `device_of(name)` (device maps)."""
    with open_source(path, cpu_packer) as source:
        names = _select(source, keys)
        real = source.real_names(names)
        portability.require_known_packers({n: source.types[n] for n in real}, str(source.path))
        place = {n: _concrete(device_of(n)) for n in real}
        plan: dict[str, portability.Converter] = {}
        for device in dict.fromkeys(place.values()):
            types = {n: source.types[n] for n in real if place[n] == device}
            plan.update(portability.plan_loading(types, device, relayout=relayout))
        if verify:
            _verify_digests(source, real)
        return _build(source, names, place.__getitem__, plan)[0]


def stored_bytes(path: PathLike, cpu_packer: str | None = None) -> dict[str, int]:
    """Bytes each tensor stores (tied names share their target's), read from headers alone."""
    with open_source(path, cpu_packer) as source:
        sizes = {n: source.flat(n, None).nbytes for n in source.types}
        return {**sizes, **{a: sizes[t] for a, t in source.aliases.items()}}


def _build(source: Source, names: list[str], device_of: Callable[[str], torch.device],
           converters: dict[str, portability.Converter]) -> tuple[dict[str, torch.Tensor], dict[str, str | None]]:
    """The one rebuild loop: the named tensors each on `device_of(name)`, re-laying out those with a
    converter; parts bound for an accelerator are read straight onto it while the wrappers are built
    (constructors touch no bytes: tests/test_codec.py checks every registered type); aliases share. Also
    returns each stored tensor's packer (the converter's where it re-packed)."""
    built, packers = {}, {}
    real = source.real_names(names)
    place = {n: device_of(n) for n in real}
    direct = {n: d for n, d in place.items() if n not in converters and d.type != "cpu"}
    loading = _read_direct(source, direct)
    try:
        for name in track(real, "loading", len(real)):
            target, where = place[name], f"{source.path}: {name}"
            flat = read_flat(source.checkpoint, name, target, loading.parts.__getitem__) if loading and name in direct \
                else source.flat(name, target)
            packers[name] = source.types[name].packer
            if name in converters:
                codec.check_record(flat, where)
                flat, packers[name] = converters[name](flat, target)
            built[name] = codec.rebuild(flat, where, target)
    except BaseException:
        if loading:
            loading.cancel()
        raise
    if loading:
        loading.wait()
    return {n: built[source.aliases.get(n, n)] for n in names}, packers


def _concrete(device: torch.device) -> torch.device:
    """A CUDA device with its index, so parts bound for "cuda" and "cuda:0" share one allocation."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _read_direct(source: Source, place: dict[str, torch.device]) -> device_load.Loading | None:
    """Start reading the parts of safetensors tensors bound for accelerators straight onto them (device_load)."""
    ckpt = source.checkpoint
    if ckpt is None or not place:
        return None
    keys = {p.key: device for n, device in place.items() for p in ckpt.entries[n].parts.values()}
    return device_load.start_loading(ckpt.shards, {k: (ckpt.key_to_shard[k], d) for k, d in keys.items()})


def _verify_digests(source: Source, names: list[str]) -> list[str]:
    """Check recorded digests; raise one CorruptCheckpointError naming every tensor that changed."""
    if source.digests is None:
        raise CorruptCheckpointError(f"{source.path} was not packed by aockpt, so it records no digests to verify")
    bad = []
    for name in track(names, "verifying", len(names)):
        for inner, digest, data in source.digests(name):
            if sha256_hex(data) != digest:
                bad.append(f"{name} (part {inner})")
    if bad:
        raise CorruptCheckpointError(
            f"{source.path}: {len(bad)} tensor part(s) do not match their recorded digest: {', '.join(bad[:10])}; "
            "the file was modified or damaged: re-download or re-pack it"
        )
    return names


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
    with open_source(path, cpu_packer, foreign_ok=True) as source:
        ckpt = source.checkpoint
        tensors = []
        for name, (type_name, packer) in source.types.items():
            flat = source.flat(name, None)
            if flat.shape is None:
                flat = codec.flatten(name, codec.rebuild(flat, f"{source.path}: {name}"))
            verdicts = {d: portability.verdict(type_name, packer, portability.parse_device(d).type) for d in devices}
            tensors.append(TensorInfo(name, type_name, list(flat.shape), DTYPE_NAMES[flat.dtype], flat.nbytes,
                                      source.made_on[name], _portability(type_name), packer, None, verdicts,
                                      source.origins.get(name), portability.packer_candidates(type_name, packer),
                                      _tp_split(type_name)))
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
    types = {n: kind.type for n, kind in source.types.items()}
    return stock_verdict(read_config(config), types, legacy=bool(source.origins),
                         backing=Backing.of_source(source), path=config)


def _portability(type_name: str) -> str:
    """The portability class of a type name."""
    return tensor_type_named(type_name, type_name).portability.value


def _tp_split(type_name: str) -> str:
    """How tensor parallelism slices a type (registry `TensorType.tp`)."""
    return tensor_type_named(type_name, type_name).tp_text()


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
        _verify_digests(source, names)
        for name in names:
            codec.rebuild(source.flat(name, None), f"{source.path}: {name}")
        check_torchao_records(source.checkpoint)
        total = sum(sum(len(d) for _, _, d in source.digests(n)) for n in names)
        return VerifyReport(str(path), len(names) + len(source.aliases), total)
