"""Writing packed checkpoints: tensors -> shards with torchao records plus the aockpt record."""

from __future__ import annotations

import multiprocessing
import signal
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from huggingface_hub.serialization import split_state_dict_into_shards_factory

from . import __version__, codec, format as fmt
from .errors import AockptError, UnsupportedTensorError, UsageError
from .progress import track
from .fetch import page_releaser
from .registry import DTYPE_NAMES
from .safetensors_io import aligned_order, write_file
from .typed_json import encode

DEFAULT_MAX_SHARD_SIZE = "5GB"


@dataclass
class SourceTensor:
    """A tensor on its way into a packed file, with what is known of where it was made."""

    name: str
    tensor: torch.Tensor
    device: str  # device type it was made on, "unknown" where the source does not say
    packer: str | None  # packer of a pinned layout, None where unknown or not pinned


def producer() -> dict[str, str]:
    """Versions of the software that wrote a file."""
    import torchao

    return {"aockpt": __version__, "torch": torch.__version__, "torchao": torchao.__version__}


def _entry(item: SourceTensor, flat: codec.FlatTensor) -> fmt.TensorEntry:
    """The aockpt record entry of one tensor, digests still empty."""
    parts = {}
    for inner, part in flat.parts.items():
        key = fmt.stored_key(flat.row, item.name, inner)
        parts[inner] = fmt.PartEntry(key, DTYPE_NAMES[part.dtype], list(part.shape), "")
    attrs = {k: encode(v) for k, v in flat.attrs.items()}
    return fmt.TensorEntry(flat.row.name, list(flat.shape), DTYPE_NAMES[flat.dtype], item.device,
                           flat.row.portability.value, item.packer, parts, attrs)


@dataclass
class _Planned:
    """A tensor ready to be written: its flat form, entry and torchao record attributes."""

    flat: codec.FlatTensor
    entry: fmt.TensorEntry
    torchao_attrs: dict


def _plan(items: list[SourceTensor]) -> tuple[dict[str, _Planned], dict[str, str]]:
    """Flatten every tensor, find aliases, and refuse two parts landing on one key."""
    fmt.check_not_reserved([i.name for i in items])
    aliases = codec.aliases([(i.name, i.tensor) for i in items])
    planned: dict[str, _Planned] = {}
    owner: dict[str, str] = {}
    for item in items:
        if item.name in aliases:
            continue
        flat = codec.flatten(item.name, item.tensor)
        entry = _entry(item, flat)
        fmt.check_not_reserved([p.key for p in entry.parts.values()])
        for part in entry.parts.values():
            if part.key in owner:
                raise UnsupportedTensorError(
                    f"{item.name} and {owner[part.key]} both need the stored key {part.key!r}; rename one of them"
                )
            owner[part.key] = item.name
        planned[item.name] = _Planned(flat, entry, {k: encode(v, tuples=False) for k, v in flat.attrs.items()})
    clash = fmt.prefix_clash({n: p.entry for n, p in planned.items()}, sorted({*owner, *planned, *fmt.RESERVED_NAMES}))
    if clash is not None:
        raise UnsupportedTensorError(
            f"{clash[1]!r} starts with {fmt.part_key(clash[0], '')!r}, where stock torchao collects the parts of "
            f"{clash[0]}, so it would read {clash[0]} wrongly; rename one of them"
        )
    return planned, aliases


def write_packed(items: Iterable[SourceTensor], dst: Path, *, max_shard_size: int | str | None = None,
                 workers: int = 1, release_pages: bool = False) -> int:
    """Write tensors into folder `dst` as a packed checkpoint; returns the bytes of tensor data.

    Shards are planned from part sizes alone (no tensor data is read), then written one by one, or by
    `workers` forked processes, each shard's bytes being the same whatever the number of workers.
    `release_pages` drops each written part's file-mapped pages from this process (pack's source views,
    never read again), so resident memory stays near one shard, not the whole checkpoint.
    """
    if workers < 1:
        raise UsageError(f"workers must be at least 1, got {workers}")
    items = sorted(items, key=lambda item: item.name)
    planned, aliases = _plan(items)
    try:
        split = split_state_dict_into_shards_factory(
            {name: p.flat.nbytes for name, p in planned.items()}, get_storage_size=int,
            filename_pattern=fmt.SHARD_PATTERN, max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE,
        )
    except ValueError as e:
        raise UsageError(f"max shard size {max_shard_size!r} is not a size; give bytes or text like '5GB' "
                         f"or '500MB' ({e})") from e
    made_by = producer()
    torchao_records = {n: fmt.torchao_record(p.entry, p.torchao_attrs) for n, p in planned.items()}
    jobs = [_job(dst / filename, names, planned, aliases) for filename, names in split.filename_to_tensors.items()]
    write = partial(_write_shard, made_by=made_by, torchao_records=torchao_records, release_pages=release_pages)
    if workers == 1 or len(jobs) == 1:
        for job in track(jobs, "packing", len(jobs)):
            write(job)
    else:
        _in_workers(write, jobs, workers)
    if len(jobs) > 1:
        weight_map = {p.key: job.path.name for job in jobs for t in job.planned.values() for p in t.entry.parts.values()}
        (dst / fmt.INDEX_NAME).write_text(fmt.index_to_json(weight_map, split.metadata["total_size"]))
    return int(split.metadata["total_size"])


@dataclass
class _ShardJob:
    """One shard to write: its path, tensors and the aliases whose target it holds."""

    path: Path
    planned: dict[str, _Planned]
    aliases: dict[str, str]


def _job(path: Path, names: list[str], planned: dict[str, _Planned], aliases: dict[str, str]) -> _ShardJob:
    """A shard's job: its tensors and the aliases of the tensors it holds."""
    held = set(names)
    return _ShardJob(path, {n: planned[n] for n in names}, {a: t for a, t in aliases.items() if t in held})


def _write_shard(job: _ShardJob, *, made_by: dict, torchao_records: dict[str, str], release_pages: bool) -> None:
    """One shard: parts in aligned order, header with every tensor's torchao record and this shard's aockpt record.

    Every shard carries the torchao records of all tensors, as transformers' own save_pretrained does:
    transformers 5.17 reads the metadata of one shard only, and fails on tensors another shard lists.
    """
    parts = aligned_order([(p.entry.parts[i].key, t) for p in job.planned.values() for i, t in p.flat.parts.items()])

    def metadata(digests: dict[str, str]) -> dict[str, str]:
        for p in job.planned.values():
            for part in p.entry.parts.values():
                part.digest = digests[part.key]
        tensors = {n: p.entry for n, p in job.planned.items()}
        tensors.update({a: fmt.TensorEntry("", [], "", "", "", None, {}, {}, alias_of=t)
                        for a, t in job.aliases.items()})
        return fmt.shard_metadata(fmt.Record(fmt.FORMAT_VERSION, made_by, tensors), torchao_records)

    release = page_releaser() if release_pages else None
    write_file(job.path, parts, metadata, release)


def _in_workers(write: Callable[[_ShardJob], None], jobs: list[_ShardJob], workers: int) -> None:
    """Write shards in forked processes (they share the parent's tensors, nothing is pickled); first error wins."""
    ctx = multiprocessing.get_context("fork")
    errors = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(write, jobs[i::workers], errors), daemon=True)
             for i in range(min(workers, len(jobs)))]
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # until workers set handlers
    try:
        try:
            for proc in procs:
                proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        for proc in procs:
            proc.join()
    except BaseException:  # Ctrl-C or SIGTERM in the parent: stop the workers before the staged folder goes
        started = [proc for proc in procs if proc.pid is not None]
        for proc in started:
            proc.terminate()
        for proc in started:
            proc.join()
        raise
    if not errors.empty():
        raise errors.get()
    failed = [p.exitcode for p in procs if p.exitcode]
    if failed:
        raise AockptError(f"a shard-writing worker died (exit code {failed[0]}); retry with workers=1 to see why")


def _worker(write: Callable[[_ShardJob], None], jobs: list[_ShardJob], errors: Any) -> None:
    """Body of one worker process: write its shards, report the first exception to the parent.

    Ctrl-C reaches the whole process group: workers ignore it and die quietly by SIGTERM when the parent,
    which handles it, stops them (no traceback per worker).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        for job in jobs:
            write(job)
    except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it as one line
        errors.put(e)
        sys.exit(1)
