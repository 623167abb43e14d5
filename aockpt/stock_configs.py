"""What stock transformers does with a torchao config record in config.json: ``TorchAoConfig.from_dict`` and
torchao's ``config_from_dict`` repeated check by check (`stock_refusal`), with classes from a table, never by
``getattr`` on a name from the file.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torchao.core.config import AOBaseConfig
from torchao.quantization import granularity as _g

from .registry import DTYPES


def stock_refusal(quantization_config: dict[str, Any]) -> str | None:
    """Why stock ``TorchAoConfig.from_dict`` (torchao's ``config_from_dict``) fails on a torchao
    quantization_config, None where it reads it: the same checks, in the same order, with the classes
    looked up in a table of torchao's allowed modules instead of by ``getattr`` on a name from the file.

    Only classes that hold configuration (torchao configs, granularities, enums, named tuples) are
    built, as stock builds them; a record naming anything else (a function, a module, a tensor or
    layer class) is a refusal, whatever stock would do with it.
    """
    quant_type = quantization_config.get("quant_type")
    if not isinstance(quant_type, dict) or list(quant_type) != ["default"]:
        return "quant_type must be an object with the one key 'default' holding a torchao config record"
    try:
        config = _rebuild(quant_type["default"], depth=0)
    except _Refusal as e:
        return str(e)
    if not isinstance(config, AOBaseConfig):
        return f"quant_type is a {type(config).__name__}, not a torchao config"
    return None


class _Refusal(Exception):
    """Stock's config_from_dict fails on this record."""


MAX_RECORD_DEPTH = 16


def _rebuild(record: Any, depth: int) -> Any:
    """One record as config_from_dict builds it, refusing where it fails or would build a non-config."""
    import enum

    if depth > MAX_RECORD_DEPTH:
        raise _Refusal("config records nested too deep")
    if not isinstance(record, dict) or "_type" not in record or "_data" not in record:
        raise _Refusal("a config record lacks '_type' or '_data'")
    name, data = record["_type"], record["_data"]
    if name == "torch.dtype":
        if data not in DTYPES:
            raise _Refusal(f"torch.dtype record names {data!r}, not a dtype")
        return DTYPES[data][0]
    cls = _config_classes().get(name) if isinstance(name, str) else None
    if cls is None:
        raise _Refusal(f"{name!r} is not a configuration class of torchao's allowed modules")
    if not isinstance(data, dict):
        if issubclass(cls, enum.Enum):
            if not isinstance(data, str) or data not in cls.__members__:
                raise _Refusal(f"{data!r} is not a member of {name}")
            return cls[data]
        return data  # stock tries cls(data) and keeps the raw value when that fails
    built = {k: _value(v, depth) for k, v in data.items()}
    try:
        return cls(**built)
    except Exception as e:  # noqa: BLE001 - stock wraps every constructor error the same way
        raise _Refusal(f"Failed to create instance of {name}: {type(e).__name__}: {e}") from None


def _value(value: Any, depth: int) -> Any:
    """A field value: nested records rebuilt (in lists and objects too), anything else as it is."""
    def is_record(v: Any) -> bool:
        return isinstance(v, dict) and "_type" in v and "_data" in v

    if is_record(value):
        return _rebuild(value, depth + 1)
    if isinstance(value, list):
        return [_rebuild(v, depth + 1) if is_record(v) else v for v in value]
    if isinstance(value, dict):
        return {k: _rebuild(v, depth + 1) if is_record(v) else v for k, v in value.items()}
    return value


@functools.cache
def _config_classes() -> dict[str, type]:
    """Name -> class for the configuration classes torchao's deserializer can reach: torchao configs,
    granularities, enums and named tuples defined in its allowed modules; a name two modules bind to
    different objects is left out (stock's pick between them depends on set order)."""
    import dataclasses
    import enum
    import importlib

    from torchao.core.config import ALLOWED_AO_MODULES

    found: dict[str, dict[int, Any]] = {}
    for module in sorted(ALLOWED_AO_MODULES):
        for name, obj in vars(importlib.import_module(module)).items():
            found.setdefault(name, {})[id(obj)] = obj
    holds_config = (AOBaseConfig, enum.Enum, _g.Granularity)
    return {name: obj for name, (obj,) in ((n, tuple(o.values())) for n, o in found.items() if len(o) == 1)
            if isinstance(obj, type) and (issubclass(obj, holds_config) or (
                issubclass(obj, tuple) and hasattr(obj, "_fields")) or (
                dataclasses.is_dataclass(obj) and not issubclass(obj, (torch.nn.Module, torch.Tensor))))}
