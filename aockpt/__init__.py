"""aockpt: safe, portable, bit-exact checkpoints for torchao-quantized PyTorch models.

The public names below are imported on first use, so tools that need only a part of aockpt (the git
pre-push hook, ``aockpt --help``) do not pay for importing torch and torchao.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("pack", "save", "unpack"), "api"),
    **dict.fromkeys(("load_quantized", "Shards"), "load"),
    **dict.fromkeys(("inspect", "verify", "CheckpointInfo", "TensorInfo", "VerifyReport"), "report"),
    **dict.fromkeys(("load_pretrained", "save_pretrained"), "pretrained"),
    "safe_load": "unpickle",
    "TPShard": "tp",
    **dict.fromkeys(("export", "serving_verdicts", "ExportReport", "ServingVerdict"), "ct_export"),
    **dict.fromkeys(("AockptError", "CorruptCheckpointError", "DeviceMemoryError", "ForeignCheckpointError",
                     "HubError", "KeyMismatchError", "OutputError", "PortabilityError", "UnsafeCheckpointError",
                     "UnsupportedTensorError", "UsageError"), "errors"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Import a public name's module the first time the name is used."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'aockpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
