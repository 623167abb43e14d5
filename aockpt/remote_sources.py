"""Remote checkpoints as sources: where a Hub repo or an object-store URL becomes what the loaders read.

`open_remote` is the one place a location turns into something the pipeline opens. A whole load of a Hub
repo reads through the Hugging Face cache (a local folder); everything else (object storage, and partial
reads of the Hub: inspect, ``keys=``, tensor-parallel slices) opens each safetensors shard by range
(aockpt.remote_shards) after fetching the folder's small files (index, config, tokenizer) into a private
staging folder. The index (or the single ``model.safetensors``) is the commit marker: a prefix holding
shards without it was not uploaded completely and is refused.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .errors import CorruptCheckpointError
from .filenames import PICKLE_SUFFIXES
from .format import INDEX_NAME, WEIGHTS_NAME, read_index
from .hub_files import HubFolder, OTHER_WEIGHTS, open_hub, snapshot
from .locations import HubRepo, Location, ObjectUrl, UrlPath, hub_settings, locate
from .object_files import ObjectFolder, open_folder
from .remote_io import concurrency
from .reader import Checkpoint, _assemble as join_shards
from .remote_shards import RemoteShard, fetch_parts

SMALL_FILE_LIMIT = 64 * 1024 * 1024  # a non-weight file larger than this is not staged


def model_folder(where: Any) -> tuple[Path, Any]:
    """For load_pretrained: a local folder holding config.json (and the model's other small files), and
    what to load the weights from, both from one opening: a Hub repo is one cached snapshot; an object-store
    prefix is listed once, its small files staged beside its shards, each pinned to its version."""
    location: Location = locate(where)
    if isinstance(location, Path):
        return location, location
    if isinstance(location, HubRepo):
        folder = snapshot(location, None if hub_settings().offline else open_hub(location).files)
        return folder, folder
    opened = _remote_source(open_folder(location))
    return (opened, opened) if isinstance(opened, Path) else (opened.path, opened)


def open_remote(where: Any, *, partial: bool) -> Path | Checkpoint:
    """A local Path for local inputs, whole Hub loads (the cache) and staged pickle folders, else a remote
    safetensors checkpoint for aockpt.sources to make a Source of.

    `partial`: only some bytes will be read (inspect, keys=, slices), so a Hub repo is read by range.
    """
    if isinstance(where, Checkpoint):  # opened already (load_pretrained: config and weights from one opening)
        return where
    location: Location = locate(where)
    if isinstance(location, Path):
        return location
    if isinstance(location, HubRepo):
        if hub_settings().offline:
            return snapshot(location)
        folder = open_hub(location)
        if not partial and not _names_file(location.subfolder):
            return snapshot(location, folder.files)
        return _remote_source(folder)
    return _remote_source(open_folder(_parent(location)) if _names_file(location.url) else open_folder(location),
                          _names_file(location.url))


def _names_file(path: str) -> str | None:
    """The file name when a location names one safetensors file rather than a folder."""
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return last if last.endswith(".safetensors") else None


def _parent(location: ObjectUrl) -> ObjectUrl:
    """The prefix holding a single-file URL."""
    return ObjectUrl(location.url.rsplit("/", 1)[0])


def _remote_source(folder: HubFolder | ObjectFolder, single: str | None = None) -> Checkpoint | UrlPath:
    """Stage the small files and open the shards by range: the checkpoint (a pickle folder: staged whole)."""
    if isinstance(folder, HubFolder) and folder.repo.subfolder and _names_file(folder.repo.subfolder):
        sub, single = folder.repo.subfolder.rsplit("/", 1) if "/" in folder.repo.subfolder else ("", folder.repo.subfolder)
        folder = open_hub(HubRepo(folder.repo.repo_id, folder.commit, sub))
    listing = folder.list()
    staging = tempfile.mkdtemp(prefix="aockpt-remote-")
    root = UrlPath(staging, folder.url)
    try:
        opened = _assemble(folder, listing, root, single)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    weakref.finalize(opened, shutil.rmtree, staging, True)  # the staging folder lives as long as what holds it
    return opened


def _assemble(folder: HubFolder | ObjectFolder, listing: dict[str, int], root: UrlPath,
              single: str | None) -> Checkpoint | UrlPath:
    """Safetensors shards opened by range beside the staged small files, or a pickle folder staged whole."""
    weights = _shard_names(folder.url, listing, single)
    if weights is None:  # pickles are read whole anyway: stage them and open the folder as on disk
        _stage(folder, root, [n for n in listing if not _other_weights(n)])
        return root
    shard_names, weight_map = weights
    _stage(folder, root, [n for n in listing if _small(n, listing[n])])
    if weight_map is not None:
        weight_map = read_index(root / INDEX_NAME)
        shard_names = sorted(set(weight_map.values()))
        missing = [n for n in shard_names if n not in listing]
        if missing:
            raise CorruptCheckpointError(f"{root / INDEX_NAME} names shard {missing[0]!r}, which is not under "
                                         f"{folder.url}; the upload is incomplete: re-upload the folder")
    return join_shards(root / single if single else root, open_shards(folder, root, shard_names), weight_map)


def _shard_names(url: str, listing: dict[str, int], single: str | None) -> tuple[list[str], Any] | None:
    """The shards to open (and whether an index lists them), or None for a pickle folder; the index or
    model.safetensors is the commit marker."""
    if single is not None:
        if single not in listing:
            raise CorruptCheckpointError(f"{url}/{single} does not exist")
        return [single], None
    if INDEX_NAME in listing:
        return [], True
    if WEIGHTS_NAME in listing:
        return [WEIGHTS_NAME], None
    if any(n.endswith(".safetensors") for n in listing):
        raise CorruptCheckpointError(f"{url} holds safetensors shards but no {INDEX_NAME}, which is written last: "
                                     "the upload did not finish (or is still running); wait for it or upload again")
    if any(Path(n).suffix in PICKLE_SUFFIXES for n in listing):
        return None
    raise CorruptCheckpointError(f"{url} holds no checkpoint: expected {WEIGHTS_NAME}, {INDEX_NAME} or "
                                 "pytorch_model.bin" + ("" if listing else " (the prefix is empty or absent)"))


def _small(name: str, size: int) -> bool:
    """Whether a file is fetched into staging: everything but weights, up to SMALL_FILE_LIMIT."""
    return not name.endswith(".safetensors") and not _other_weights(name) and Path(name).suffix not in \
        PICKLE_SUFFIXES and size <= SMALL_FILE_LIMIT and not name.startswith(".")


def _other_weights(name: str) -> bool:
    """Weights in formats aockpt does not read."""
    return any(Path(name).match(p) for p in OTHER_WEIGHTS)


def _stage(folder: HubFolder | ObjectFolder, root: UrlPath, names: list[str]) -> None:
    """Fetch files whole into the staging folder, concurrently."""
    def get(name: str) -> None:
        with open(root.local() / name, "wb") as f:
            f.write(folder.read(name))

    with ThreadPoolExecutor(min(concurrency(), max(1, len(names)))) as pool:
        for done in [pool.submit(get, n) for n in names if "/" not in n]:
            done.result()


def open_shards(folder: HubFolder | ObjectFolder, root: UrlPath, names: list[str]) -> dict[str, RemoteShard]:
    """Each shard pinned and its header read, concurrently."""
    def one(name: str) -> RemoteShard:
        return RemoteShard(folder.open(name), root / name)

    with ThreadPoolExecutor(min(concurrency(), max(1, len(names)))) as pool:
        return dict(zip(names, pool.map(one, names)))


def fetch_ahead(source: Any, names: list[str], verify: bool) -> bool:
    """Read the named stored tensors of a remote source concurrently, checking digests as they arrive when
    `verify`; False for a local source (nothing done: it reads from its files as it builds)."""
    ckpt = source.checkpoint
    if ckpt is None or not all(isinstance(s, RemoteShard) for s in ckpt.shards.values()):
        return False
    if verify and source.digests is None:
        raise CorruptCheckpointError(f"{source.path} was not packed by aockpt, so it records no digests to verify")
    keys: dict[str, list[str]] = {}
    digests: dict[str, str] = {}
    for name in names:
        for part in ckpt.entries[name].parts.values():
            keys.setdefault(ckpt.key_to_shard[part.key], []).append(part.key)
            if verify:
                digests[part.key] = part.digest
    fetch_parts(ckpt.shards, keys, digests)
    return True

