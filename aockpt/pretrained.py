"""Hugging Face model folders: save and load transformers models."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import CorruptCheckpointError, KeyMismatchError, UnsupportedTensorError
from .hf_config import CONFIG_NAME, model_class as _causal_lm_class, skeleton, truthful_config

PathLike = str | os.PathLike


def save_pretrained(model: Any, dst: PathLike, *, force: bool = False,
                    max_shard_size: int | str | None = None) -> Path:
    """Write a quantized transformers model as a packed folder that stock ``from_pretrained`` loads.

    transformers 5.23's own ``save_pretrained`` fails on torchao 0.18 tensors on CPU (it asks the
    wrapper subclass for a storage pointer), so this writes the config files and packed weights itself.
    config.json's quantization_config is derived from the tensors written (after ``quantize_`` the
    model's config usually has none), and a tie the tensors no longer share is switched off.
    """
    from .api import state_items
    from .atomic import staged
    from .codec import aliases
    from .hf_config import rewritten_config
    from .writer import write_packed

    state = model.state_dict()
    with staged(dst, force=force) as tmp:
        write_packed(state_items(state), tmp, max_shard_size=max_shard_size)
        model.config.save_pretrained(tmp)
        text = rewritten_config(tmp / CONFIG_NAME, state, aliases(list(state.items())))
        if text is not None:
            (tmp / CONFIG_NAME).write_text(text)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
    return Path(dst)


def load_pretrained(path: PathLike, device: str | torch.device = "cpu", *, relayout: bool = False,
                    dtype: torch.dtype | None = None, model_class: type | None = None,
                    cpu_packer: str | None = None) -> Any:
    """A transformers causal LM with aockpt-loaded weights on `device`, for every type aockpt can load.

    Works where stock ``from_pretrained`` cannot: CPU ``Int4OpaqueTensor``, legacy torchao folders, and
    int4 re-laid out for another device. The model class comes from transformers' own config table;
    no code from the folder runs: the class is `model_class` if given, else transformers' causal-LM class
    for the config's type, else its base model class. Missing or unexpected weights are an error listing
    each name. `cpu_packer` names the CPU packer of int4 weights the folder does not record (as for `pack`).

    Raises:
        KeyMismatchError, PortabilityError, CorruptCheckpointError, UnsafeCheckpointError.
    """
    from transformers import AutoConfig

    from .api import load_quantized

    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file():
        raise CorruptCheckpointError(f"{folder} has no {CONFIG_NAME}; load_pretrained needs a model folder")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model_class = model_class or _causal_lm_class(config)
    if model_class is None:
        raise UnsupportedTensorError(f"{folder}: transformers has no model class for model type "
                                     f"{config.model_type!r}; pass model_class=")
    state = load_quantized(folder, device, relayout=relayout, cpu_packer=cpu_packer)
    _settle_ties(config, state, folder)
    model, info = model_class.from_pretrained(None, config=config, state_dict=state, output_loading_info=True,
                                              dtype=dtype or getattr(config, "dtype", None) or torch.bfloat16)
    problems = [f"{k} {kind}" for kind in ("missing", "unexpected", "mismatched")
                for k in sorted(info[f"{kind}_keys"], key=str)]
    if problems:
        raise KeyMismatchError(f"{folder}: weights do not match the model: {', '.join(map(str, problems[:10]))}"
                               + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""))
    return model.to(device).eval()



def _settle_ties(config: Any, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Leave a stored tie to transformers (drop the second name) and untie names stored apart.

    transformers compares two stored tied weights with ``torch.equal``, which torchao tensors do not
    implement; deciding here keeps that comparison from running.
    """
    from .hf_config import read_config

    skel = skeleton(read_config(folder / CONFIG_NAME))
    for target, source in (skel.ties.items() if skel is not None else ()):
        if target in state and source in state:
            if state[target] is state[source]:
                del state[target]
            else:
                config.tie_word_embeddings = False
