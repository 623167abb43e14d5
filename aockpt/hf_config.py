"""config.json of a quantized model folder: the quantization_config its tensors imply, its weight ties, and
what stock transformers' ``from_pretrained`` will do with the folder."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch

from . import foreign
from .config_rules import Backing, bounded_build, check_buffers, check_config
from .errors import CorruptCheckpointError
from .filenames import CONFIG_NAME
from .paths import member
from .stock_configs import stock_refusal
from .registry import TensorType, tensor_type_of
from .typed_json import load_file

if TYPE_CHECKING:
    from .sources import Source

# The `_type` of a torchao config record that no torchao module defines: stock transformers refuses the
# folder with "Failed to find class ...", instead of loading the weights it cannot read as random ones.
AOCKPT_ONLY = "LoadWithAockptLoadPretrained"


def read_config(path: Path) -> dict[str, Any]:
    """config.json as a dict (size-checked, strict JSON), refused unless it is a JSON object."""
    config = load_file(path)
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{path} is not a JSON object")
    return config


def is_legacy_config(quantization_config: Any) -> bool:
    """Whether a quantization_config holds a layout or a config version that torchao 0.18 refuses.

    A config or layout record is legacy when torchao 0.18 has no class of that name (deleted layouts and
    configs) or its ``_version`` differs from the one that class declares (helper records such as
    ``Float8MMConfig`` stay at version 1 and are current).
    """
    versions = _current_versions()
    stack = [quantization_config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            kind = item.get("_type")
            if isinstance(kind, str) and kind != AOCKPT_ONLY and kind.endswith(("Layout", "Config")) and (
                    kind not in versions or item.get("_version", 1) != versions[kind]):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


@functools.cache
def _current_versions() -> dict[str, int]:
    """Config class name -> the version torchao's deserializer expects, from torchao's own allowed modules."""
    import importlib

    from torchao.core.config import ALLOWED_AO_MODULES

    versions = {}
    for module in ALLOWED_AO_MODULES:
        for name, obj in vars(importlib.import_module(module)).items():
            version = getattr(obj, "version", 1) if isinstance(obj, type) else None
            if name.endswith("Config") and version is not None:
                versions.setdefault(name, version if type(version) is int else 1)
    return versions


def model_class(config: Any) -> type | None:
    """transformers' causal-LM class for a config, else its base model class; None where it has neither."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None) or MODEL_MAPPING.get(type(config), None)


def config_class(config: dict[str, Any]) -> type | None:
    """transformers' config class for a config.json's model_type, None for a type it does not know."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    return CONFIG_MAPPING[model_type] if isinstance(model_type, str) and model_type in CONFIG_MAPPING else None


def transformers_config(config: dict[str, Any], path: Path | str = CONFIG_NAME, cls: type | None = None) -> Any | None:
    """config.json as a transformers config (its quantization_config left out), None for an unknown model type.

    `cls` is the config class to use where transformers does not know the model type. Whatever
    transformers' config class raises is one CorruptCheckpointError naming `path`.
    """
    cls = config_class(config) or cls
    if cls is None:
        return None
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    return bounded_build(lambda: cls.from_dict(plain), Backing(0), path, "read the config")


@dataclass
class Skeleton:
    """What the model class says about its parameters: weight ties, which modules are embeddings, and
    the order transformers lists the parameters in (the first floating one sets config.json's dtype)."""

    ties: dict[str, str]  # tied name -> the name it shares storage with (transformers' target -> source)
    embeddings: frozenset[str]  # module names of the input and output embeddings
    linear: frozenset[str]  # module names of nn.Linear modules
    parameters: tuple[str, ...] = ()  # model.parameters() order, each tie once


def meta_model(cls: type, hf: Any, backing: Backing, path: Path | str) -> torch.nn.Module:
    """The model `cls` builds from a checked config, on the meta device (no memory, no init): within the
    module budget the tensors back, with computed buffers the tensors back; else one refusal line."""
    def build() -> torch.nn.Module:
        with torch.device("meta"):
            return cls._from_config(hf)

    model = bounded_build(build, backing, path, f"build {cls.__name__}")
    check_buffers(model, backing, path)
    return model


def skeleton(config: dict[str, Any], backing: Backing, path: Path | str = CONFIG_NAME) -> Skeleton | None:
    """The model config.json describes, checked against the tensors that back it and built on the meta
    device; None where transformers lacks it (an unknown or newer model type, a missing optional package).

    Raises:
        CorruptCheckpointError: a config no model of these tensors has (check_config, the build budget),
            or one transformers refuses to read or build.
    """
    check_config(config, backing, path)
    hf = transformers_config(config, path)
    cls = model_class(hf) if hf is not None else None
    if cls is None:
        return None
    try:
        model = meta_model(cls, hf, backing, path)
    except ImportError:
        return None
    modules = dict(model.named_modules())
    emb = [model.get_input_embeddings()]
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = frozenset(n for n, m in modules.items() if any(m is e for e in [*emb, out] if e is not None))
    linear = frozenset(n for n, m in modules.items() if isinstance(m, torch.nn.Linear))
    return Skeleton(dict(model.get_expanded_tied_weights_keys(all_submodels=True)), embeddings, linear,
                    tuple(n for n, _ in model.named_parameters()))


def folder_skeleton(source: Source) -> Skeleton | None:
    """The skeleton of a model folder's config.json, None for a file (its neighbours were not named) or a
    folder without one; the config must live inside the folder and be backed by the folder's tensors."""
    if not source.path.is_dir():
        return None
    path = member(source.path, CONFIG_NAME)
    return skeleton(read_config(path), Backing.of_source(source), path) if path.is_file() else None


def _module(name: str) -> str:
    """The module a parameter belongs to (the parameter's own name for a non-`weight` parameter)."""
    module, _, leaf = name.rpartition(".")
    return module if leaf == "weight" else name


def quantization_config(state: dict[str, torch.Tensor], skel: Skeleton | None) -> dict[str, Any] | None:
    """The quantization_config transformers 5 + torchao 0.18 read for exactly these tensors; None if none is quantized.

    One config when every quantized module agrees, else FqnToConfig per module; plain linear weights are
    listed in `modules_to_not_convert`; quantized embeddings set `include_input_output_embeddings`. A type
    stock torchao cannot read gets a config record stock transformers refuses with an error.
    """
    from torchao.core.config import config_to_dict
    from torchao.quantization import FqnToConfig
    from transformers import TorchAoConfig

    typed = {n: (tensor_type_of(t, n), t) for n, t in state.items()}
    quantized = {n: (e, t) for n, (e, t) in typed.items() if e.quantized}
    if not quantized:
        return None
    per_module = {_module(n): e.config(t) if e.config and e.stock_loadable else None for n, (e, t) in quantized.items()}
    unreadable = sorted({e.name for n, (e, _) in quantized.items() if per_module[_module(n)] is None})
    if unreadable:
        return {"quant_method": "torchao", "quant_type": {"default": {
            "_type": AOCKPT_ONLY, "_version": 1,
            "_data": {"tensor_types": unreadable, "reason": "stock torchao 0.18 cannot read these tensors"}}}}
    records = [config_to_dict(c) for c in per_module.values()]
    quant = next(iter(per_module.values())) if all(r == records[0] for r in records) else FqnToConfig(per_module)
    plain_linear = [_module(n) for n, t in state.items() if n not in quantized and n.endswith(".weight")
                    and t.dim() == 2 and (skel is None or _module(n) in skel.linear)]
    embedded = skel is not None and any(_module(n) in skel.embeddings for n in quantized)
    config = TorchAoConfig(quant, modules_to_not_convert=sorted(set(plain_linear)) or None,
                           include_input_output_embeddings=embedded)
    return json.loads(json.dumps(config.to_dict()))


def weights_dtype(state: dict[str, torch.Tensor], order: Iterable[str]) -> str | None:
    """config.json's dtype as transformers' save_pretrained derives it: the (outer) dtype of the first
    floating-point parameter in the model's parameter order, then of any tensor written; None if none is."""
    names = [*(n for n in order if n in state), *state]
    first = next((state[n].dtype for n in names if state[n].dtype.is_floating_point), None)
    return None if first is None else str(first).removeprefix("torch.")


def truthful_config(config: dict[str, Any], state: dict[str, torch.Tensor], aliases: dict[str, str],
                    path: Path | str = CONFIG_NAME, order: Iterable[str] | None = None) -> dict[str, Any]:
    """config.json as it must read for these tensors: derived quantization_config and dtype, ties only
    where stored as ties.

    Args:
        state: every tensor written, by name (aliases included).
        aliases: name -> the name whose storage it shares.
        order: the model's parameter names in its order; default: the order of the config's skeleton.
    """
    torchao = any(tensor_type_of(t, n).quantized for n, t in state.items())
    foreign.refuse_if(foreign.detect(config, state, torchao=torchao), CONFIG_NAME)  # never replace another's config
    skel = skeleton(config, Backing.of_state(state), path)
    out = dict(config)
    derived = quantization_config(state, skel)
    if derived is None:
        out.pop("quantization_config", None)
    else:
        out["quantization_config"] = derived
    dtype = weights_dtype(state, order if order is not None else skel.parameters if skel else ())
    if dtype is not None:  # a pre-5 "torch_dtype" key is kept in step; transformers 5 reads "dtype" first
        out.update({k: dtype for k in ("dtype", "torch_dtype") if k == "dtype" or k in out})
    if skel is not None and out.get("tie_word_embeddings"):
        def root(n: str) -> str:
            return aliases.get(n, n)
        if any(t in state and s in state and root(t) != root(s) for t, s in skel.ties.items()):
            out["tie_word_embeddings"] = False
    return out


def rewritten_config(config_path: Path, state: dict[str, torch.Tensor], aliases: dict[str, str],
                     order: Iterable[str] | None = None) -> str | None:
    """config.json text made truthful for the tensors written, or None if it already is."""
    config = read_config(config_path)
    if "model_type" not in config:
        return None
    new = truthful_config(config, state, aliases, config_path, order)
    return None if new == config else json.dumps(new, indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class StockVerdict:
    """What stock ``AutoModelForCausalLM.from_pretrained(folder)`` does with a model folder."""

    loads: bool  # True: it loads exactly these tensors; False: it refuses, would load wrong weights, or
    # reads them through another library's quantizer (aockpt.foreign)
    verdict: str  # "loads exactly" | "refuses" | "loads wrong weights" | "reads it through <method>"
    reason: str


def stock_verdict(config: dict[str, Any], types: dict[str, TensorType], *, legacy: bool, backing: Backing,
                  path: Path | str = CONFIG_NAME) -> StockVerdict:
    """Decide, from config.json and the stored tensor types, what stock from_pretrained does.

    A folder of another quantization library is judged by that library's quantizer (aockpt.foreign). Otherwise
    the config is checked and its model built first (a config no model of these tensors has is refused
    with CorruptCheckpointError); then stock's own checks decide, in the order stock meets them.

    Args:
        types: stored tensor name -> its registry row (aliases excluded).
        legacy: the weights are torchao <= 0.17 pickles, which stock torch.load refuses.
        backing: what the stored tensors back (the budget of the model the config describes).
    """
    rows = {r.name: r for r in types.values() if r.quantized}
    quantized = sorted(rows)
    found = foreign.detect(config, types, torchao=bool(quantized))
    if found is not None:
        return StockVerdict(*foreign.stock_outcome(found))
    skel = skeleton(config, backing, path)
    unknown = _unknown_model(config)
    if unknown:
        return StockVerdict(False, "refuses", unknown)
    qc = config.get("quantization_config")
    if legacy:
        return StockVerdict(False, "refuses", "torchao <= 0.17 pickles: their classes no longer exist; "
                                              "run aockpt pack")
    if not quantized:
        return StockVerdict(True, "loads exactly", "plain tensors only")
    if not isinstance(qc, dict):
        return StockVerdict(False, "loads wrong weights", "config.json has no quantization_config, so transformers "
                                                          "ignores the quantized parts and keeps random weights; "
                                                          "run aockpt pack to write one")
    if qc.get("quant_method") == "compressed-tensors":
        return _compressed_tensors_verdict(qc)
    if qc.get("quant_method") != "torchao":
        return StockVerdict(False, "loads wrong weights", f"quantization_config names quant_method "
                                                          f"{qc.get('quant_method')!r}, not torchao, so the torchao "
                                                          "parts are not read; run aockpt pack to write the right one")
    if is_legacy_config(qc):
        return StockVerdict(False, "refuses", "quantization_config holds torchao <= 0.17 (version 1) configs; "
                                              "run aockpt pack to rewrite it")
    unreadable = [t for t in quantized if not rows[t].stock_loadable or rows[t].config is None]
    if unreadable or AOCKPT_ONLY in json.dumps(qc):
        return StockVerdict(False, "refuses", f"stock torchao cannot read {', '.join(unreadable) or 'these tensors'}; "
                                              "load with aockpt.load_pretrained")
    refusal = stock_refusal(qc)
    if refusal:
        return StockVerdict(False, "refuses", f"stock TorchAoConfig.from_dict fails: {refusal}; run aockpt pack")
    twice = [(t, s) for t, s in (skel.ties.items() if skel and config.get("tie_word_embeddings") else ())
             if t in types and s in types and any(types[n].quantized for n in (t, s))]
    if twice:
        return StockVerdict(False, "refuses", f"config.json ties {twice[0][0]} to {twice[0][1]} but both are stored, "
                                              f"and transformers' tie check (torch.equal) is not implemented for "
                                              f"{types[twice[0][0]].name}/{types[twice[0][1]].name}; run aockpt pack")
    return StockVerdict(True, "loads exactly", f"torchao {', '.join(quantized)} with a matching quantization_config")


def _compressed_tensors_verdict(qc: dict[str, Any]) -> StockVerdict:
    """A compressed-tensors folder: transformers decompresses it through compressed-tensors; an asymmetric
    packed group fails in its default (compressed) mode, where the meta-device model skips packing the zero
    point (docs/serving.md, measured)."""
    groups = qc.get("config_groups") if isinstance(qc.get("config_groups"), dict) else {}
    asym = [n for n, g in groups.items() if isinstance(g, dict) and isinstance(g.get("weights"), dict)
            and g["weights"].get("symmetric") is False and (g.get("format") or qc.get("format")) == "pack-quantized"]
    if asym:
        return StockVerdict(False, "refuses", f"compressed-tensors group {asym[0]} is asymmetric pack-quantized: "
                                              "transformers fails on its zero points unless loaded with "
                                              "CompressedTensorsConfig(dequantize=True); or run aockpt pack")
    return StockVerdict(True, "loads exactly", "compressed-tensors folder: transformers decompresses it through "
                                               "compressed-tensors (pip install compressed-tensors)")


def _unknown_model(config: dict[str, Any]) -> str | None:
    """Why stock AutoConfig refuses a config's model type (absent, unknown, or only in the folder's own
    code, which stock runs only with trust_remote_code); None where it knows it."""
    if config_class(config) is not None:
        return None
    if "auto_map" in config:
        return ("config.json asks for the folder's own model code (auto_map), which stock runs only with "
                "trust_remote_code=True and aockpt never runs")
    return f"this transformers has no model type {config.get('model_type')!r}"


def tied_partner(name: str, skel: Skeleton | None) -> str | None:
    """The name a parameter is tied to by the model's rules (either direction), None if it is not tied."""
    if skel is None:
        return None
    if name in skel.ties:
        return skel.ties[name]
    return next((t for t, s in skel.ties.items() if s == name), None)
