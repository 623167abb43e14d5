"""Export to compressed-tensors (the format vLLM and SGLang serve with its fastest kernels), and say per tensor
what that export does.

Every tensor is read through ``open_source`` and rebuilt on CPU; each quantized module weight becomes the
codes of ``aockpt/ct_codes.py`` (exact, or refused with a reason; re-quantized with a measured error only
when asked), laid out by compressed-tensors' own helpers (``aockpt/ct_format.py``), and written with the
quantization_config compressed-tensors itself writes (``ModelCompressor.update_config``) into a staged
destination (``atomic.staged``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import ct_codes, ct_format, ct_table
from .api import source_tensors
from .atomic import staged
from .errors import UnsupportedTensorError, UsageError
from .filenames import CONFIG_NAME, INDEX_NAME
from .hf_config import Skeleton, folder_skeleton, read_config, tied_partner
from .registry import tensor_type_of
from .safetensors_io import write_file
from .sources import Source, open_source

FORMATS = ("compressed-tensors",)


@dataclass
class ServingVerdict:
    """What export does with one tensor, and what vLLM's torchao path does with it as it is."""

    name: str
    type: str
    verdict: str  # exact | lossy | refused | dense | tied
    target: str  # compressed-tensors format and scheme, "" where none
    error: float | None = None  # lossy: measured max |compressed-tensors dequantization - torchao dequantize()|
    reason: str | None = None  # refused (or lossy): why there is no exact counterpart
    vllm: str = ""  # vLLM torchao path, from its source (ct_table.vllm_text)
    codes: ct_codes.Codes | None = field(default=None, repr=False, compare=False)


@dataclass
class ExportReport:
    """A finished export: where it went and what happened to each tensor."""

    path: str
    tensors: list[ServingVerdict]


def _describe(c: ct_codes.Codes, fmt: str) -> str:
    """A scheme in a few words: format, weight bits/strategy, activations."""
    w = c.weights
    group = f" {w['group_size']}" if w.get("group_size") else ""
    if w.get("block_structure"):
        group = f" {'x'.join(map(str, w['block_structure']))}"
    sym = "" if w["symmetric"] else " asym"
    acts = ""
    if c.input_activations:
        a = c.input_activations
        size = f" {a['group_size']}" if a.get("group_size") else ""
        acts = f", {a['type']}{a['num_bits']} dynamic {a['strategy']}{size} activations"
    return f"{fmt} {w['type']}{w['num_bits']} {w['strategy']}{group}{sym}{acts}"


def _module(name: str, where: str) -> str:
    """The module a quantized weight belongs to; compressed-tensors quantizes module weights only."""
    module, _, leaf = name.rpartition(".")
    if leaf != "weight" or not module:
        raise UnsupportedTensorError(f"{where}: {name} is quantized but is not a module's `weight`; "
                                     "compressed-tensors stores quantized module weights only")
    return module


def verdict_of(name: str, tensor: torch.Tensor, packer: str | None, *, lossy: bool) -> ServingVerdict:
    """Export's verdict on one tensor: exact codes (checked: compressed-tensors' decompression equals torchao's
    dequantize() bit for bit), lossy codes with their measured error, refused, or dense."""
    row = tensor_type_of(tensor, name)
    vllm = ct_table.vllm_text(row, tensor)
    if not row.quantized:
        return ServingVerdict(name, row.name, "dense", "dense", vllm=vllm)
    m = ct_table.mapping(row)
    want = None
    try:
        if m.read is None:
            raise ct_codes.Refused(f"{row.name} has no compressed-tensors counterpart ({m.exact})")
        codes, verdict, reason = m.read(tensor, packer), "exact", None
        want = ct_codes.reference(tensor, packer)
        error = _difference(codes, want)
        if error is not None:
            raise ct_codes.Refused(f"compressed-tensors' decompression differs from torchao's dequantize() (max "
                                   f"abs difference {error:.3g})")
    except ct_codes.Refused as e:
        if not lossy or m.lossy is None:
            return ServingVerdict(name, row.name, "refused", "", reason=str(e), vllm=vllm)
        codes, verdict, reason = _lossy(tensor, packer), "lossy", str(e)
        codes.error = _difference(codes, ct_codes.reference(tensor, packer) if want is None else want) or 0.0
    fmt = ct_format.format_of(ct_format.scheme(codes))
    return ServingVerdict(name, row.name, verdict, _describe(codes, fmt), codes.error if verdict == "lossy" else None,
                          reason, vllm, codes)


def _difference(codes: ct_codes.Codes, want: torch.Tensor) -> float | None:
    """None where compressed-tensors' decompression of `codes` equals `want` bit for bit (in want's dtype),
    else the max absolute difference (0.0 where only signs of zero or NaN payloads differ)."""
    s = ct_format.scheme(codes)
    fmt = ct_format.format_of(s)
    got = ct_format.decompress(ct_format.to_parts(codes, fmt), s, fmt).to(want.dtype)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[want.element_size()]
    if torch.equal(got.contiguous().view(bits), want.contiguous().view(bits)):
        return None
    return float((got.float() - want.float()).abs().nan_to_num(0.0).max())


def _lossy(tensor: torch.Tensor, packer: str | None) -> ct_codes.Codes:
    """The nearest compressed-tensors counterpart of a tensor that has no exact one."""
    if type(tensor).__name__ == "NVFP4Tensor":
        return ct_codes.nvfp4_nearest(tensor)
    kind, bits, group = ct_codes.bits_and_group(tensor)
    return ct_format.requantized(ct_codes.reference(tensor, packer), kind, bits, group, tensor.dtype)


def _tensors(source: Source) -> dict[str, torch.Tensor]:
    """Every stored tensor of a source rebuilt on CPU (aliases left to the caller)."""
    stored = set(source.types)
    return {item.name: item.tensor for item in source_tensors(source) if item.name in stored}


def serving_verdicts(path: str | os.PathLike, *, lossy: bool = True, cpu_packer: str | None = None) -> list[ServingVerdict]:
    """Per tensor: what ``export(..., format="compressed-tensors")`` does (with ``lossy``: the error it would
    state) and what vLLM's torchao path does with the folder as it is."""
    ct_format.ct()
    with open_source(path, cpu_packer) as source:
        tensors = _tensors(source)
        out = [verdict_of(n, t, source.types[n].packer, lossy=lossy) for n, t in tensors.items()]
        for v in out:
            v.codes = None  # a report, not an export: nothing keeps the converted weights alive
        for alias, target in source.aliases.items():
            out.append(ServingVerdict(alias, source.types[target].row.name, "tied", f"tied to {target}"))
        return out


def export(src: str | os.PathLike, dst: str | os.PathLike, *, format: str = "compressed-tensors",
           lossy: bool = False, force: bool = False, cpu_packer: str | None = None) -> ExportReport:
    """Write a compressed-tensors model folder at `dst` from any checkpoint aockpt reads.

    Args:
        src: any input `pack` accepts (packed or torchao folder, pickle, ...).
        dst: the folder to create; it must not exist unless `force`.
        format: "compressed-tensors" (the only one).
        lossy: re-quantize tensors that have no exact counterpart instead of refusing them; the report
            states each one's measured max error.
        cpu_packer: as for `pack`, for CPU int4 weights whose file does not say which packer wrote them.
    Raises:
        UsageError (unknown format, compressed-tensors missing), UnsupportedTensorError naming every tensor
        without an exact counterpart and why (unless `lossy`), and whatever reading `src` raises.
    """
    if format not in FORMATS:
        raise UsageError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    ct_format.ct()
    with open_source(src, cpu_packer) as source:
        tensors = _tensors(source)
        verdicts = [verdict_of(n, t, source.types[n].packer, lossy=lossy) for n, t in tensors.items()]
        _refuse(verdicts, source)
        skel = folder_skeleton(source)
        with staged(dst, force=force, source=src) as tmp:
            state, groups = _state(verdicts, tensors, source.aliases, skel, source)
            _write_weights(state, tmp)
            _copy_files(source, tmp, tensors)
            _write_config(groups, skel, tmp)
    return ExportReport(str(dst), verdicts)


def _refuse(verdicts: list[ServingVerdict], source: Source) -> None:
    """One error naming every tensor with no exact counterpart, and why."""
    refused = [v for v in verdicts if v.verdict == "refused"]
    if refused:
        by_reason: dict[str, list[str]] = {}
        for v in refused:
            by_reason.setdefault(f"{v.type}: {v.reason}", []).append(v.name)
        listed = "; ".join(f"{', '.join(names)} ({why})" for why, names in by_reason.items())
        raise UnsupportedTensorError(
            f"{source.path}: {len(refused)} tensor(s) have no exact compressed-tensors counterpart: {listed}; "
            "pass --lossy (lossy=True) to re-quantize them and state the error, or leave them as they are")


def _state(verdicts: list[ServingVerdict], tensors: dict[str, torch.Tensor], aliases: dict[str, str],
           skel: Skeleton | None, source: Source) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """The folder's tensors by key, and the config groups: scheme key -> (codes, format, module names)."""
    state: dict[str, torch.Tensor] = {}
    groups: dict[str, tuple] = {}
    by_name = {v.name: v for v in verdicts}
    names = [*tensors, *(a for a in aliases if tied_partner(a, skel) != aliases[a])]
    for name in names:
        v = by_name[aliases.get(name, name)]
        if v.codes is None:
            state[name] = tensors[aliases.get(name, name)]
            continue
        module = _module(name, str(source.path))
        s = ct_format.scheme(v.codes)
        fmt = ct_format.format_of(s)
        for local, part in ct_format.to_parts(v.codes, fmt).items():
            state[f"{module}.{local}"] = part
        key = json.dumps([v.codes.weights, v.codes.input_activations, fmt], sort_keys=True)
        groups.setdefault(key, (v.codes, fmt, []))[2].append(module)
    return state, groups


def _write_weights(state: dict[str, torch.Tensor], dst: Path) -> None:
    """Shards of at most 5 GB, as transformers writes them (one file, or shards with an index)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size="5GB")
    for filename, keys in split.filename_to_tensors.items():
        write_file(dst / filename, [(k, state[k].contiguous()) for k in keys], lambda _: {"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (dst / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _copy_files(source: Source, dst: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Carry the folder's other files over; config.json loses torchao's quantization_config. Without a
    config.json, one stating the weights' dtype is written (compressed-tensors' files do not record it)."""
    if not any(extra.name == CONFIG_NAME for extra in source.extra_files):
        dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.dtype.is_floating_point}
        if len(dtypes) == 1:
            (dst / CONFIG_NAME).write_text(json.dumps({"dtype": dtypes.pop()}, indent=2) + "\n")
    for extra in source.extra_files:
        if extra.name == CONFIG_NAME:
            config = read_config(extra)
            config.pop("quantization_config", None)
            (dst / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copy2(extra, dst / extra.name)


def _write_config(groups: dict[str, tuple], skel: Skeleton | None, dst: Path) -> None:
    """quantization_config, written by compressed-tensors' own ModelCompressor.update_config."""
    if not groups:
        return
    from compressed_tensors.compressors.model_compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    quantized = {m for _, _, modules in groups.values() for m in modules}
    linear_only = skel is not None and quantized <= skel.linear
    one = len(groups) == 1 and linear_only
    config_groups = {}
    for i, (codes, fmt, modules) in enumerate(groups.values()):
        s = ct_format.scheme(codes, ["Linear"] if one else sorted(modules))
        s.format = fmt
        config_groups[f"group_{i}"] = s
    formats = {fmt for _, fmt, _ in groups.values()}
    ignore = sorted(skel.linear - quantized) if skel is not None else []
    qc = QuantizationConfig(config_groups=config_groups, format=formats.pop() if len(formats) == 1 else
                            "mixed-precision", quantization_status=QuantizationStatus.COMPRESSED, ignore=ignore)
    ModelCompressor(quantization_config=qc).update_config(str(dst))
