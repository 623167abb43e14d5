"""Hugging Face model folders: save and load transformers models."""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from . import device_map as dm, foreign
from .atomic import staged
from .codec import aliases
from .config_rules import Backing, bounded_build, check_config
from .errors import CorruptCheckpointError, KeyMismatchError, UnsafeCheckpointError, UnsupportedTensorError
from .hf_config import (CONFIG_NAME, config_class, meta_model, model_class as _causal_lm_class, read_config,
                        rewritten_config, transformers_config, weights_dtype)
from .load import load_placed, stored_bytes
from .portability import parse_device
from .sources import open_source
from .api import state_items
from .writer import write_packed
from .object_files import destination
from .paths import member
from .remote_sources import model_folder

PathLike = str | os.PathLike


def save_pretrained(model: Any, dst: PathLike, *, force: bool = False,
                    max_shard_size: int | str | None = None) -> Path:
    """Write a quantized transformers model as a packed folder that stock ``from_pretrained`` loads.

    transformers 5.23's own ``save_pretrained`` fails on torchao 0.18 tensors on CPU (it asks the
    wrapper subclass for a storage pointer), so this writes the config files and packed weights itself,
    deriving what transformers derives at save time from the model, not from its (possibly stale)
    config: ``dtype`` from the weights written (torchao tensors' outer dtype), ``architectures`` from
    the model's class, ``transformers_version``, and generation_config.json where the model generates.
    The quantization_config is derived from the tensors (after ``quantize_`` the model's config usually
    has none), and a tie the tensors no longer share is switched off. The model itself is not changed.
    """
    foreign.refuse_if(foreign.of_model(model), type(model).__name__)
    state = model.state_dict()
    order = [n for n, _ in model.named_parameters()]
    config = copy.deepcopy(model.config)
    config.dtype = weights_dtype(state, order)
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    with staged(dst, force=force) as tmp:
        write_packed(state_items(state), tmp, max_shard_size=max_shard_size)
        config.save_pretrained(tmp)
        text = rewritten_config(tmp / CONFIG_NAME, state, aliases(list(state.items())), order)
        if text is not None:
            (tmp / CONFIG_NAME).write_text(text)
        if model.can_generate():
            model.generation_config.save_pretrained(tmp)
    return destination(dst)


def load_pretrained(path: PathLike, device: str | torch.device = "cpu", *, relayout: bool = False,
                    dtype: torch.dtype | None = None, model_class: type | None = None,
                    cpu_packer: str | None = None, device_map: str | dict[str, Any] | None = None,
                    verify: bool = False) -> Any:
    """A transformers causal LM with aockpt-loaded weights on `device`, for every type aockpt can load.

    Works where stock ``from_pretrained`` cannot: CPU ``Int4OpaqueTensor``, legacy torchao folders, and
    int4 re-laid out for another device. The model class comes from transformers' own config table;
    no code from the folder runs: the class is `model_class` if given, else transformers' causal-LM class
    for the config's type, else its base model class. config.json is checked before transformers reads
    it, and the model it describes must be backed by the stored tensors (`aockpt.config_rules`). The
    model is built with its parameters on the meta device and aockpt's tensors are attached as they are
    (each read once, straight onto its device); missing, unexpected or mis-shaped weights are an error
    listing each name. `dtype` defaults to config.json's (which aockpt derives from the weights). `cpu_packer`
    names the CPU packer of int4 weights the folder does not record (as for `pack`). `device_map`
    ("auto", "balanced", "sequential" or a dict of module name -> device, accelerate's conventions)
    spreads the model over several devices instead of `device`. `path` may name a Hub repo or an object-store
    prefix (docs/remote.md). `verify` checks every tensor's recorded digest as its bytes are read.

    Raises:
        KeyMismatchError, PortabilityError, CorruptCheckpointError, UnsafeCheckpointError, UsageError,
        UnsupportedTensorError (a model type transformers does not know, and no `model_class`).
    """
    folder, weights = model_folder(path)
    model_class, config, backing = _checked_config(folder, weights, model_class, cpu_packer)
    with _parameters_on_meta():
        model = bounded_build(lambda: model_class._from_config(
            config, dtype=dtype or getattr(config, "dtype", None) or torch.bfloat16), backing,
            folder / CONFIG_NAME, f"build {model_class.__name__}")
    model.tie_weights()
    tied = _ties(model)
    if device_map is None:
        mapping = {"": parse_device(device)}
    else:  # placing needs every name and size first, so a mismatch is reported before anything is read
        sizes = stored_bytes(weights, cpu_packer)
        _check_names(model, set(sizes), tied, folder)
        mapping = dm.resolve(device_map, model, sizes, tied)
    state = load_placed(weights, lambda n: dm.device_of(n, mapping), relayout=relayout, cpu_packer=cpu_packer,
                        verify=verify)
    tied = _stored_ties(model, state, tied)
    _check_names(model, set(state), tied, folder)
    _attach(model, state, tied, mapping, folder)
    if device_map is not None:
        dm.dispatch(model, mapping)
    return model.eval()


def _checked_config(folder: Path, weights: Any, model_class: type | None,
                    cpu_packer: str | None) -> tuple[type, Any, Backing]:
    """The model class and transformers config for a folder, from its config.json read once and checked
    (types, ranges, and a meta-device build within what the stored tensors back, read from the headers of
    `weights`: the folder, or where a remote folder's weights are) before the real build."""
    path = member(folder, CONFIG_NAME)
    if not path.is_file():
        raise CorruptCheckpointError(f"{folder} has no {CONFIG_NAME}; load_pretrained needs a model folder")
    raw = read_config(path)
    with open_source(weights, cpu_packer, partial=True) as source:
        backing = Backing.of_source(source)
    check_config(raw, backing, path)
    if config_class(raw) is None and model_class is None:
        if "auto_map" in raw:
            raise UnsafeCheckpointError(f"{path} asks for the folder's own model code (auto_map) and names no "
                                        "model type transformers knows; aockpt never runs code from a file: "
                                        "pass model_class=")
        raise UnsupportedTensorError(f"{folder}: transformers has no model type {raw.get('model_type')!r}; "
                                     "pass model_class=")
    config = transformers_config(raw, path, getattr(model_class, "config_class", None))
    model_class = model_class or _causal_lm_class(config)
    if model_class is None:
        raise UnsupportedTensorError(f"{folder}: transformers has no model class for model type "
                                     f"{config.model_type!r}; pass model_class=")
    meta_model(model_class, config, backing, path)
    return model_class, config, backing


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside register their parameters on the meta device (no memory, no init); buffers stay real,
    so computed non-persistent buffers (rotary frequencies) keep their values."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _ties(model: torch.nn.Module) -> dict[str, str]:
    """Tied parameter names -> the first name of the same parameter, as the skeleton ties them."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


def _stored_ties(model: torch.nn.Module, state: dict[str, torch.Tensor], tied: dict[str, str]) -> dict[str, str]:
    """The ties the folder keeps: names stored as two different tensors stay apart (and the config says so).

    Tying them would silently replace one stored weight by the other, e.g. a plain head by the quantized
    embedding that `quantize_` put in place of the tied one.
    """
    apart = {t for t, s in tied.items() if t in state and s in state and state[t] is not state[s]}
    if apart:
        model.config.tie_word_embeddings = False
    return {t: s for t, s in tied.items() if t not in apart}


def _check_names(model: torch.nn.Module, names: set[str], tied: dict[str, str], folder: Path) -> None:
    """Refuse a checkpoint whose names do not cover the model's or add others."""
    expected = set(model.state_dict(keep_vars=True))
    given = names | {t for t, s in tied.items() if s in names} | {s for t, s in tied.items() if t in names}
    _report(folder, {"missing": sorted(expected - given), "unexpected": sorted(names - expected)})


def _report(folder: Path, problems: dict[str, list[str]]) -> None:
    """One KeyMismatchError naming up to ten problem weights."""
    found = [f"{k} {kind}" for kind, keys in problems.items() for k in keys]
    if found:
        raise KeyMismatchError(f"{folder}: weights do not match the model: {', '.join(found[:10])}"
                               + (f" (and {len(found) - 10} more)" if len(found) > 10 else ""))


def _attach(model: torch.nn.Module, state: dict[str, torch.Tensor], tied: dict[str, str],
            mapping: dict[str, torch.device], folder: Path) -> None:
    """Put the loaded tensors into the skeleton as they are, re-tie, and move the computed buffers."""
    expected = model.state_dict(keep_vars=True)
    for target, source in tied.items():
        state.setdefault(source, state.get(target))
        state.setdefault(target, state[source])
    _report(folder, {"mismatched": sorted(k for k, v in expected.items() if tuple(v.shape) != tuple(state[k].shape))})
    model.load_state_dict(state, strict=True, assign=True)
    for target, source in tied.items():
        owner, _, leaf = target.rpartition(".")
        setattr(model.get_submodule(owner), leaf, model.get_parameter(source))
    persistent = set(expected)
    for name, buffer in list(model.named_buffers()):
        if name not in persistent:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = buffer.to(dm.device_of(name, mapping))
