"""compressed-tensors model folders as an input: each quantized module weight becomes the torchao 0.18 tensor
whose ``dequantize()`` equals compressed-tensors' decompression, so ``aockpt pack`` turns llm-compressor's
checkpoints into torchao ones (CPU or any GPU, re-layout, inspect).

``importable(config)`` says whether a folder's config.json is one aockpt imports (``IMPORTED_FORMATS``):
other tools that refuse foreign folders ask it before refusing a compressed-tensors one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import codec, ct_format, ct_torchao
from .errors import CorruptCheckpointError, UnsupportedTensorError
from .filenames import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME
from .config_rules import Backing
from .ct_table import IMPORTED_FORMATS, formats as _formats, imports
from .hf_config import read_config, skeleton
from .paths import member
from .portability import TensorKind
from .reader import Checkpoint, is_packed, open_checkpoint, read_flat
from .registry import PLAIN, TENSOR_TYPES

METHOD = "compressed-tensors"
_ROOTS = ("weight_packed", "weight")  # the first parameter compressed-tensors stores per quantized weight
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _quantization_config(config: Any) -> dict[str, Any] | None:
    """config.json's compressed-tensors quantization_config, None when it has none."""
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return qc if isinstance(qc, dict) and qc.get("quant_method") == METHOD else None


def importable(config: Any) -> bool:
    """Whether aockpt imports a folder with this config.json (ct_table.imports on its quantization_config)."""
    qc = _quantization_config(config)
    return qc is not None and imports(qc)


def imports_folder(path: Path) -> bool:
    """Whether a folder is read by this importer: safetensors weights not in aockpt's own format (whose names
    aockpt.foreign judges) and a config.json (read size-checked) that aockpt imports; aockpt.foreign refuses
    other compressed-tensors formats."""
    if not (path / CONFIG_NAME).is_file() or not ((path / WEIGHTS_NAME).is_file() or (path / INDEX_NAME).is_file()):
        return False
    return importable(read_config(member(path, CONFIG_NAME))) and not is_packed(path)


@dataclass
class ImportedFolder:
    """A compressed-tensors folder opened for import: what `sources` makes a Source of."""

    kind: str
    types: dict[str, TensorKind]
    flat: Callable[[str], codec.FlatTensor]  # quantized module weights as torchao tensors, the rest plain
    release: Callable[[], None]  # closes the shards


@dataclass
class _Module:
    """One quantized module weight: its module name, scheme and format."""

    module: str
    scheme: Any
    format: str


def open_folder(path: Path) -> ImportedFolder:
    """Open a compressed-tensors folder: quantized module weights become torchao tensors, the rest stay plain."""
    config = read_config(member(path, CONFIG_NAME))
    if not importable(config):
        qc = _quantization_config(config) or {}
        raise UnsupportedTensorError(
            f"{path} is a compressed-tensors folder in format(s) {sorted(map(str, _formats(qc)))} "
            f"(status {qc.get('quantization_status')!r}); aockpt imports {', '.join(sorted(IMPORTED_FORMATS))} "
            "stored compressed: load it with compressed-tensors instead")
    ct_format.ct()
    ckpt = open_checkpoint(path)
    try:
        modules = _modules(ckpt, config, path)
        dtype = _DTYPES.get(config.get("dtype") or config.get("torch_dtype"), None)
        owned = {f"{m.module}.{local}" for m in modules.values() for local in _stored(ckpt, m)}
        types = {n: TensorKind(TENSOR_TYPES[ct_torchao.target_type(*ct_format.args_of(m.scheme), f"{path}: {n}")], None)
                 for n, m in modules.items()}
        types.update({k: TensorKind(PLAIN, None) for k in ckpt.entries if k not in owned})
    except BaseException:
        ckpt.close()
        raise

    def flat(name: str) -> codec.FlatTensor:
        if name not in modules:
            return read_flat(ckpt, name)
        m, where = modules[name], f"{path}: {name}"
        parts = {local: ckpt.part(f"{m.module}.{local}") for local in _stored(ckpt, m)}
        codes = ct_format.from_parts(parts, m.scheme, m.format, dtype or _dtype_of(parts), where)
        return codec.flatten(name, ct_torchao.to_torchao(codes, where))

    kind = f"compressed-tensors folder ({', '.join(sorted(_formats(config['quantization_config'])))})"
    return ImportedFolder(kind, types, flat, ckpt.close)


def _stored(ckpt: Checkpoint, m: _Module) -> list[str]:
    """The parameter names a module stores: the compressor's own names, plus any optional ones present."""
    names = list(ct_format.param_names(m.scheme, m.format))
    optional = ("weight_zero_point", "weight_global_scale", "weight_shape")
    names += [n for n in optional if n not in names and f"{m.module}.{n}" in ckpt.entries]
    missing = [n for n in names if f"{m.module}.{n}" not in ckpt.entries]
    if missing:
        raise CorruptCheckpointError(f"{ckpt.path}: {m.module} is quantized ({m.format}) but stores no "
                                     f"{', '.join(missing)}; the checkpoint is incomplete: re-download or re-export it")
    return names


def _dtype_of(parts: dict[str, torch.Tensor]) -> torch.dtype:
    """The outer dtype where config.json gives none: a half-precision scale's, else bfloat16 (float32 scales
    usually belong to bf16 models)."""
    scale = parts["weight_scale"]
    return scale.dtype if scale.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def _modules(ckpt: Checkpoint, config: dict[str, Any], path: Path) -> dict[str, _Module]:
    """Every quantized module weight by its torchao name (``<module>.weight``), with its scheme and format."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_name


    try:
        qc = QuantizationConfig.model_validate(config["quantization_config"])
    except ValueError as e:
        raise CorruptCheckpointError(f"{path}: quantization_config is not a valid compressed-tensors config "
                                     f"({str(e).splitlines()[0]})") from e
    stored = [ckpt.shards[shard].slots[key].shape for key, shard in ckpt.key_to_shard.items()]
    skel = skeleton(config, Backing.of_shapes(stored), path / CONFIG_NAME)
    out = {}
    for key in ckpt.entries:
        module, _, leaf = key.rpartition(".")
        if leaf not in _ROOTS or (leaf == "weight" and f"{module}.weight_scale" not in ckpt.entries):
            continue
        if any(match_name(module, ignored) for ignored in qc.ignore or []):
            continue
        found = [(n, s) for n, s in qc.config_groups.items()
                 if any(_targets(module, t, skel, match_name) for t in s.targets)]
        if len(found) != 1:
            raise UnsupportedTensorError(
                f"{path}: {module} stores quantized weights but matches {len(found)} config groups "
                f"({', '.join(n for n, _ in found) or 'none'}); aockpt needs exactly one per module")
        scheme = found[0][1]
        out[f"{module}.weight"] = _Module(module, scheme, scheme.format or qc.format)
    return out


def _targets(module: str, target: str, skel: Any, match_name: Callable[[str, str], bool]) -> bool:
    """Whether a config group target names this module: a name or ``re:`` pattern, or the class ``Linear``."""
    if target == "Linear":
        return skel is None or module in skel.linear
    return match_name(module, target)
