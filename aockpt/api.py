"""The write verbs: pack, save, unpack (loading is aockpt.load, describing and checking aockpt.report).

The load and report verbs are re-exported here, so ``aockpt.api`` stays the one module the CLI calls."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from . import portability
from .atomic import staged
from .errors import OutputError, UnsupportedTensorError
from .filenames import PICKLE_SUFFIXES, PICKLE_WEIGHTS
from .hf_config import CONFIG_NAME, rewritten_config
from .load import CPU, PathLike, load_from, load_placed, load_quantized, stored_bytes  # noqa: F401 - re-exported
from .plan import Placement
from .report import CheckpointInfo, TensorInfo, VerifyReport, inspect, verify  # noqa: F401 - re-exported
from .sources import Source, from_state_dict, merge_stored_ties, open_source
from .object_files import destination
from .writer import SourceTensor, write_packed


def source_tensors(source: Source, layout_for: torch.device | None = None) -> list[SourceTensor]:
    """Rebuild every tensor of a source on CPU (zero-copy where the source allows), aliases sharing one object.

    With `layout_for`, pinned int4 tensors are re-laid out exactly for that device's kernel first.
    """
    portability.require_known_packers(source.types, str(source.path))
    built = load_from(source, dict.fromkeys(source.names, Placement(CPU)), relayout=True if layout_for else None,
                      rules_for=layout_for)
    return [SourceTensor(n, built.tensors[n], source.made_on[t], built.packers[t])
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
        items = source_tensors(source, layout_for)
        write_packed(items, tmp, max_shard_size=max_shard_size, workers=workers, release_pages=True)
        _copy_extra_files(source, tmp, {i.name: i.tensor for i in items})
    return destination(dst)


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
                                  portability.packer_here(kind.row) or kind.packer))
    return items


def save(state_dict: dict[str, torch.Tensor], dst: PathLike, *, force: bool = False,
         max_shard_size: int | str | None = None, workers: int = 1) -> Path:
    """Pack an in-memory state dict (e.g. ``model.state_dict()`` after ``quantize_``) into a folder."""
    with staged(dst, force=force) as tmp:
        write_packed(state_items(state_dict), tmp, max_shard_size=max_shard_size, workers=workers)
    return destination(dst)


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
            state = load_from(source, dict.fromkeys(source.names, Placement(CPU)), relayout=None).tensors
            _torch_save(state, tmp / PICKLE_WEIGHTS if as_folder else tmp, Path(dst))
            for extra in source.extra_files if as_folder else ():
                shutil.copy2(extra, tmp / extra.name)
    return destination(dst)


def _check_weights_only_loadable(source: Source) -> None:
    """Refuse to unpack tensor types that ``torch.load(weights_only=True)`` refuses even after ``import torchao``."""
    refused = sorted({k.row.name for k in source.types.values() if not k.row.weights_only})
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
