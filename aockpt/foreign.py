"""Checkpoints quantized by other libraries (compressed-tensors, GPTQ, AWQ, bitsandbytes, FP8, ...): one table.

aockpt converts torchao tensors only. A folder whose ``quantization_config`` names another method, or whose
tensors carry another method's names (``weight_packed``, ``qweight``, ``weight_scale_inv``, ...), holds
integers and scales that only that method's reader turns into weights; packing them as plain tensors and
dropping the config would make stock ``from_pretrained`` load random weights. Such a source is refused
(`refuse_if`) everywhere but ``inspect``, which says what it is (`describe`, `stock_outcome`).

The methods are transformers' own list (``AUTO_QUANTIZATION_CONFIG_MAPPING``) less torchao, so a method
transformers adds is refused the day it appears; `_KNOWN` adds, per method, its reader and the tensor names
its writers produce. A method's row may name a converter (`Method.converts`): the quantization_configs it
accepts are then let through to that converter's source opener instead of being refused.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from . import ct_table
from .errors import ForeignCheckpointError
from .filenames import CONFIG_NAME
from .registry import tensor_type_of
from .typed_json import load_file

# compressed-tensors also reads its config from "compression_config" (its utils/safetensors_load.py)
_CONFIG_KEYS = ("quantization_config", "compression_config")
_OURS = "torchao"


@dataclass(frozen=True, kw_only=True)
class Method:
    """A quantization method aockpt does not convert: what reads it, and what its writers name and record."""

    reader: str  # what to load its checkpoints with, as the error says it
    leaves: frozenset[str] = frozenset()  # last components of tensor names only its writers store
    needs: tuple[str, ...] = ()  # modules transformers' quantizer for it imports
    format_keys: tuple[str, ...] = ()  # quantization_config keys naming its storage format
    converts: Callable[[dict[str, Any]], bool] | None = None  # quantization_configs an aockpt importer converts


_GPTQ = frozenset({"qweight", "qzeros", "scales", "g_idx"})
# Per method: reader, the tensor names its writers produce (transformers' integrations/, the writers'
# published formats), the packages its transformers quantizer needs, and where its config names the format.
_KNOWN: dict[str, Method] = {
    "compressed-tensors": Method(
        reader="transformers + compressed-tensors, or vLLM", needs=("compressed_tensors",), format_keys=("format",),
        converts=ct_table.imports, leaves=frozenset({"weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
                                        "weight_global_scale", "weight_g_idx", "input_scale", "input_zero_point",
                                        "input_global_scale", "output_scale"})),
    "gptq": Method(reader="transformers + optimum + gptqmodel, or vLLM", leaves=_GPTQ,
                   needs=("optimum", "gptqmodel"), format_keys=("checkpoint_format",)),
    "awq": Method(reader="transformers + gptqmodel, or vLLM", leaves=_GPTQ - {"g_idx"},
                  needs=("gptqmodel",), format_keys=("version", "format")),
    "auto-round": Method(reader="transformers + auto-round", leaves=_GPTQ, needs=("auto_round",),
                         format_keys=("packing_format",)),
    "bitsandbytes_4bit": Method(
        reader="transformers + bitsandbytes", needs=("bitsandbytes",), format_keys=("bnb_4bit_quant_type",),
        leaves=frozenset({"absmax", "quant_map", "nested_absmax", "nested_quant_map", "bitsandbytes__nf4",
                          "bitsandbytes__fp4"})),
    "bitsandbytes_8bit": Method(reader="transformers + bitsandbytes", needs=("bitsandbytes",),
                                leaves=frozenset({"SCB", "weight_format"})),
    "fp8": Method(reader="transformers (FineGrainedFP8, on a GPU) or vLLM", format_keys=("weight_block_size",),
                  leaves=frozenset({"weight_scale_inv", "activation_scale"})),
    "mxfp8": Method(reader="transformers (FineGrainedFP8, on a GPU) or vLLM", leaves=frozenset({"weight_scale_inv"})),
    "fbgemm_fp8": Method(reader="transformers + fbgemm-gpu", leaves=frozenset({"weight_scale"})),
    "quark": Method(reader="transformers + amd-quark", needs=("quark",),
                    leaves=frozenset({"weight_scale", "weight_zero_point", "input_scale", "output_scale"})),
    "eetq": Method(reader="transformers + eetq", leaves=frozenset({"weight_scales"})),
    "hqq": Method(reader="transformers + hqq", needs=("hqq",), leaves=frozenset({"W_q"})),
    "aqlm": Method(reader="transformers + aqlm", leaves=frozenset({"codes", "codebooks"})),
    "higgs": Method(reader="transformers + flute-kernel", leaves=frozenset({"tables", "tables2"})),
    "bitnet": Method(reader="transformers (BitNet quantizer)", leaves=frozenset({"weight_scale"})),
    "fp_quant": Method(reader="transformers + fp_quant", leaves=frozenset({"qweight", "dqweight", "scales"})),
    "quanto": Method(reader="transformers + optimum-quanto", needs=("optimum.quanto",),
                     leaves=frozenset({"_data", "_scale"})),
    # Outside transformers' list, read by inference engines:
    "exl2": Method(reader="exllamav2 (or TabbyAPI)",
                   leaves=frozenset({"q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm", "q_perm"})),
    "modelopt": Method(reader="vLLM, SGLang or TensorRT-LLM (NVIDIA ModelOpt)", format_keys=("quant_algo",),
                       leaves=frozenset({"weight_scale", "weight_scale_2", "input_scale"})),
}
_ALL_LEAVES = frozenset().union(*(r.leaves for r in _KNOWN.values()))


@functools.cache
def methods() -> dict[str, Method]:
    """Every quantization method transformers knows except torchao, with its row (a default one if `_KNOWN` has
    none), and the rows of methods only inference engines read."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

    names = [n for n in AUTO_QUANTIZATION_CONFIG_MAPPING if n != _OURS]
    return {n: _KNOWN.get(n) or Method(reader=f"transformers' {n} quantizer") for n in dict.fromkeys([*names, *_KNOWN])}


@dataclass(frozen=True)
class Foreign:
    """What another library quantized: its method, its storage format, and the tensors that belong to it."""

    method: str  # transformers' quant_method key, or "a or b" when only tensor names tell
    format: str | None
    tensors: list[str]  # the tensors it stores beside or instead of plain weights
    in_config: bool  # named by config.json's quantization_config (else by tensor names alone)

    def describe(self) -> str:
        """What it is, e.g. "compressed-tensors checkpoint (format pack-quantized, a, b, c, ... (9 in all))"."""
        shown = ", ".join(self.tensors[:3]) + (f", ... ({len(self.tensors)} in all)" if len(self.tensors) > 3 else "")
        inner = ", ".join(p for p in (f"format {self.format}" if self.format else "", shown) if p)
        how = "" if self.in_config else " (by its tensor names; config.json does not name that method)"
        return f"{self.method} checkpoint{how}" + (f" ({inner})" if inner else "")


def _method_name(qc: Any) -> str:
    """transformers' key for a quantization_config: bitsandbytes by its bit width, as AutoQuantizationConfig does."""
    if not isinstance(qc, dict):
        return ""
    if qc.get("load_in_4bit") or qc.get("load_in_8bit"):
        return "bitsandbytes_4bit" if qc.get("load_in_4bit") else "bitsandbytes_8bit"
    method = qc.get("quant_method")
    return method if isinstance(method, str) else ""


def _format(qc: dict[str, Any], row: Method) -> str | None:
    """The storage format the config names (compressed-tensors' ``format``, AWQ's ``version``, ...)."""
    values = [qc[k] for k in row.format_keys if qc.get(k) is not None]
    if not values:
        return None
    return values[0] if isinstance(values[0], str) else json.dumps(values[0])


def _belongs(names: Iterable[str], leaves: frozenset[str]) -> list[str]:
    """Tensors with one of `leaves` as last name component, and the `weight` of each module holding one."""
    names = list(names)
    hits = [n for n in names if n.rpartition(".")[2] in leaves]
    modules = {n.rpartition(".")[0] for n in hits}
    return sorted({*hits, *(n for n in names if n.endswith(".weight") and n.rpartition(".")[0] in modules)})


def detect(config: dict[str, Any] | None, names: Iterable[str], *, torchao: bool) -> Foreign | None:
    """The foreign method that config.json (or, if it names torchao or none, the tensor names) shows; else None.

    Tensor names only another method's writers use are foreign whatever the config says. A config naming
    another method (or none) is foreign unless the tensors are torchao's own types (`torchao`: then it only
    contradicts them and the config aockpt derives from them replaces it) or that method's row converts it and
    no tensor still carries its names (an importer already turned them into torchao tensors).
    """
    names = list(names)
    qc = next((config[k] for k in _CONFIG_KEYS if config and config.get(k) is not None), None)
    method = None if qc is None else "compressed-tensors" if qc is config.get("compression_config") \
        else _method_name(qc)
    found = {n.rpartition(".")[2] for n in names} & _ALL_LEAVES
    if method not in (None, _OURS) and (found or not torchao):
        row = methods().get(method, Method(reader=""))
        if not found and row.converts is not None and row.converts(qc):
            return None
        return Foreign(method, _format(qc, row) if isinstance(qc, dict) else None, _belongs(names, row.leaves), True)
    if not found:
        return None
    best = max(len(found & r.leaves) for r in _KNOWN.values())
    candidates = [m for m, r in _KNOWN.items() if len(found & r.leaves) == best]
    return Foreign(" or ".join(candidates), None, _belongs(names, frozenset(found)), False)


def of_folder(path: Path, names: Iterable[str], *, torchao: bool) -> Foreign | None:
    """`detect` for an input path: a folder's config.json and the tensor names (a file: its names alone)."""
    config_path = path / CONFIG_NAME if path.is_dir() else None
    config = load_file(config_path) if config_path is not None and config_path.is_file() else None
    return detect(config if isinstance(config, dict) else None, names, torchao=torchao)


def error(found: Foreign, where: str | Path) -> ForeignCheckpointError:
    """The one-line refusal: what the input is, that aockpt does not convert it, and what to load it with."""
    row = methods().get(found.method.split(" or ")[0])
    reader = row.reader if row is not None else "the library that wrote it"
    if found.in_config and row is None:
        named = f"method {found.method!r}" if found.method else "no quant_method"
        what = f"config.json's quantization_config names {named}: aockpt does not convert it"
    elif found.in_config:
        fmt = f" (format {found.format})" if found.format else ""
        kind = f"this format or scheme of {found.method}" if row.converts is not None else found.method
        what = f"{found.method} folder{fmt}: aockpt does not convert {kind} checkpoints"
    else:
        what = (f"tensors such as {found.tensors[0]} are named as {found.method} write them: aockpt does not "
                "convert such checkpoints")
        reader = f"the library that wrote it ({reader})"
    return ForeignCheckpointError(
        f"{where}: {what} (stored as plain tensors they would load as random weights); load it with {reader} "
        "(or quantize the original model with torchao and pack that); nothing was written")


def refuse_if(found: Foreign | None, where: str | Path) -> None:
    """Raise the refusal for a foreign checkpoint; return for anything else."""
    if found is not None:
        raise error(found, where)


def checked(source: Any, *, refuse: bool) -> Foreign | None:
    """What a just-opened source is, if foreign: refused when `refuse` (the caller closes it), else described in
    its `kind` for inspect."""
    torchao = any(kind.row.quantized for kind in source.types.values())
    found = of_folder(source.path, source.names, torchao=torchao)
    if refuse:
        refuse_if(found, source.path)
    if found is not None:
        source.kind = f"{found.describe()}; aockpt does not convert it (pack, unpack and push refuse it)"
    return found


def of_model(model: Any) -> Foreign | None:
    """The foreign method a transformers model carries (its config's or hf_quantizer's quantization_config)."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    quantizer = getattr(model, "hf_quantizer", None)
    qc = qc if qc is not None else getattr(quantizer, "quantization_config", None)
    as_dict = qc.to_dict() if callable(getattr(qc, "to_dict", None)) else qc
    state = model.state_dict()
    return detect({"quantization_config": as_dict} if as_dict is not None else None, state,
                  torchao=any(tensor_type_of(t, n).quantized for n, t in state.items()))


def _installed(module: str) -> bool:
    """Whether a module (dotted names too) can be imported here, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def stock_outcome(found: Foreign) -> tuple[bool, str, str]:
    """What stock from_pretrained does with a foreign folder: (loads exactly, verdict, reason) for StockVerdict."""
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    if not found.in_config:
        return (False, "loads wrong weights", f"tensors are named as {found.method} writes them but config.json "
                "does not name that method, so transformers reports them unexpected and keeps random weights")
    quantizer = AUTO_QUANTIZER_MAPPING.get(found.method)
    if quantizer is None:
        return (False, "refuses", f"transformers has no quantizer for quant_method {found.method!r}" if found.method
                else "its quantization_config names no quant_method, which transformers refuses")
    row = methods()[found.method]
    missing = [m for m in row.needs if not _installed(m)]
    needs = f"; it needs {', '.join(row.needs)}: " + (f"{', '.join(missing)} not installed here" if missing
                                                        else "installed here") if row.needs else ""
    return (False, f"reads it through {found.method}",
            f"transformers' {quantizer.__name__} reads these tensors{needs}; aockpt does not convert it")
