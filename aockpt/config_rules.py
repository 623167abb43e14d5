"""The rules a config.json must pass before transformers builds anything from it, and the budget that
bounds what it may build: a config is input like any file, and its sizes must be backed by the weights.

Three steps, each refusing with one ``CorruptCheckpointError`` line: the raw JSON's types and ranges
(`check_config`, before any transformers code runs); its arithmetic against the checkpoint's tensors
(`Backing`: every layer needs a stored tensor, every size must fit a stored dimension); and
the build itself (`bounded_build`): modules registered are counted and the build stops once past what
the tensors back, and anything transformers raises while building is a refusal naming the file.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, NoReturn, Sequence, TypeVar

import torch

from .errors import CorruptCheckpointError, reason
from .registry import DTYPES

if TYPE_CHECKING:
    from .sources import Source

T = TypeVar("T")

# Fields that repeat a layer that many times: each repeat holds at least one stored tensor.
COUNTS = frozenset({
    "num_hidden_layers", "num_layers", "n_layer", "n_layers", "num_decoder_layers", "num_encoder_layers",
    "encoder_layers", "decoder_layers", "num_nextn_predict_layers",
})
# Fields that are (or divide) a dimension of some stored weight: at least 1, at most the largest one.
SIZES = frozenset({
    "hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
    "head_dim", "num_attention_heads", "num_key_value_heads", "vocab_size", "n_embd", "n_head", "n_inner",
    "d_model", "d_ff", "ffn_dim", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
    "v_head_dim",
})
# Expert counts: 0 (a dense model) or more, at most a dimension (the router's [experts, hidden] weight,
# fused expert tensors' first dimension); unfused experts' modules are bounded by the build budget.
EXPERTS = frozenset({
    "num_experts", "num_local_experts", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
    "moe_num_experts",
})
INT_LIMIT = 2**31 - 1  # any other integer: transformers and torch hold sizes and ids in int32 or less
CONFIG_DTYPES = frozenset(n for n, (dt, _) in DTYPES.items() if dt.is_floating_point and dt.itemsize >= 2)
MODULES_PER_TENSOR = 4  # a Llama layer registers 13 modules for 9 parameters; MoE and vision towers fewer
SLACK = 64  # root modules, rotary embeddings, norms of a model with very few tensors
BUFFER_FLOOR = 64 * 1024 * 1024  # computed buffers (rotary frequencies, masks) of a tiny checkpoint


@dataclass(frozen=True)
class Backing:
    """What a checkpoint's tensors can back: how many names, their largest outer dimension, their bytes."""

    tensors: int
    largest_dim: int | None = None  # None: shapes unknown without rebuilding (then only counts are checked)
    nbytes: int | None = None

    @classmethod
    def of_shapes(cls, shapes: Iterable[Sequence[int] | None], nbytes: int | None = None) -> Backing:
        """The backing of tensors with these outer shapes (None for a shape not known from headers)."""
        shapes = list(shapes)
        dims = [d for s in shapes if s is not None for d in s]
        return cls(len(shapes), max(dims, default=0) if all(s is not None for s in shapes) else None, nbytes)

    @classmethod
    def of_state(cls, state: dict[str, torch.Tensor]) -> Backing:
        """The backing of an in-memory state dict (outer shapes and bytes of torchao tensors included)."""
        return cls.of_shapes((tuple(t.shape) for t in state.values()),
                             sum(t.numel() * t.element_size() for t in state.values()))

    @classmethod
    def of_source(cls, source: Source) -> Backing:
        """The backing of an opened source, from its headers (tied and omitted names count as tensors)."""
        flats = [source.describe(n) for n in source.types]
        omitted = source.checkpoint.omitted if source.checkpoint is not None else []
        shapes = [f.shape for f in flats] + [()] * (len(source.aliases) + len(omitted))
        return cls.of_shapes(shapes, sum(f.nbytes for f in flats))

    @property
    def module_limit(self) -> int:
        """The most modules a model these tensors back may register."""
        return MODULES_PER_TENSOR * self.tensors + SLACK

    @property
    def buffer_limit(self) -> int:
        """The most bytes of computed buffers a model of these tensors may hold."""
        return max(self.nbytes or 0, BUFFER_FLOOR)


def check_config(config: dict[str, Any], backing: Backing, path: Path | str) -> None:
    """Refuse a config.json whose types, ranges or sizes no transformers model of these tensors has.

    Runs on the raw JSON before transformers reads it: ``model_type`` a string, ``dtype`` a floating
    dtype name, integers within int32, layer counts within the stored tensor count, sizes (at least 1)
    and expert counts within the largest stored dimension; sub-configs (``text_config``, ...) alike.
    """
    if "model_type" in config and not isinstance(config["model_type"], str):
        _refuse(path, f"model_type is {config['model_type']!r}, not a model type name")
    if "auto_map" in config and not isinstance(config["auto_map"], dict):
        _refuse(path, "auto_map is not an object")
    _check_fields(config, backing, path, "")


def _check_fields(config: dict[str, Any], backing: Backing, path: Path | str, prefix: str) -> None:
    """The per-field rules, applied to one config object and its sub-config objects."""
    for key, value in config.items():
        field = f"{prefix}{key}"
        if key == "quantization_config":
            continue
        if key in ("dtype", "torch_dtype") and value is not None and value not in CONFIG_DTYPES:
            _refuse(path, f"{field} is {value!r}; expected one of {', '.join(sorted(CONFIG_DTYPES))}")
        if key in COUNTS or key in SIZES or key in EXPERTS:
            _check_size(field, value, backing, path, least=0 if key in COUNTS | EXPERTS else 1,
                        per_tensor=key in COUNTS)
        if isinstance(value, dict) and key.endswith("_config"):
            _check_fields(value, backing, path, f"{field}.")
        for number in _integers(value):
            if abs(number) > INT_LIMIT:
                _refuse(path, f"{field} holds {number}, beyond any size or id transformers accepts (2**31 - 1)")


def _check_size(field: str, value: Any, backing: Backing, path: Path | str, *, least: int, per_tensor: bool) -> None:
    """An integer of at least `least`, backed by the stored tensors: at most one per tensor (`per_tensor`,
    layer counts) or at most the largest stored dimension (sizes, expert counts)."""
    if value is None:
        return
    if type(value) is not int:
        _refuse(path, f"{field} is {value!r}, not an integer")
    if value < least:
        _refuse(path, f"{field} is {value}; it must be at least {least}")
    if per_tensor and value > backing.tensors:
        _refuse(path, f"{field} is {value}, but the checkpoint stores only {backing.tensors} tensors "
                      "(each one needs at least one)")
    if not per_tensor and backing.largest_dim is not None and value > backing.largest_dim:
        _refuse(path, f"{field} is {value}, larger than every dimension of the stored tensors "
                      f"(largest {backing.largest_dim})")


def _integers(value: Any) -> Iterator[int]:
    """The integers in a JSON value (lists and objects included, bounded by the JSON budget)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is int:
            yield item
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


class _OverBudget(Exception):
    """Raised from inside a build once it registered more modules than the tensors back."""


@contextmanager
def quiet() -> Iterator[None]:
    """transformers' and Python's warnings held back while a config from a file is read (one error line)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def bounded_build(build: Callable[[], T], backing: Backing, path: Path | str, what: str) -> T:
    """Run a transformers build from a checked config: at most `backing.module_limit` modules, and any
    error it raises (a zero division, an unknown activation or rope type) becomes one refusal line.

    ImportError (an optional package transformers needs for this model) is passed on to the caller.
    """
    registered = 0

    def count(module: torch.nn.Module, name: str, child: Any) -> None:
        nonlocal registered
        registered += 1
        if registered > backing.module_limit:
            raise _OverBudget()

    handle = torch.nn.modules.module.register_module_module_registration_hook(count)
    try:
        with quiet():
            return build()
    except ImportError:
        raise
    except _OverBudget:
        _refuse(path, f"it describes a model of more than {backing.module_limit} modules, more than the "
                      f"{backing.tensors} stored tensors can hold")
    except Exception as e:  # noqa: BLE001 - transformers' own checks of a config from a file
        _refuse(path, f"transformers cannot {what} from it: {type(e).__name__}: {reason(e)}")
    finally:
        handle.remove()


def check_buffers(model: torch.nn.Module, backing: Backing, path: Path | str) -> None:
    """Refuse a model (built on the meta device) whose computed buffers would take more than the weights."""
    total = sum(b.numel() * b.element_size() for b in model.buffers())
    if total > backing.buffer_limit:
        _refuse(path, f"its model computes {total} bytes of buffers, more than the {backing.buffer_limit} "
                      "the stored tensors back")


def _refuse(path: Path | str, why: str) -> NoReturn:
    """One CorruptCheckpointError line naming the config file."""
    raise CorruptCheckpointError(f"{path}: {why}; fix or replace this config.json")
