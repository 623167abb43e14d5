"""aockpt: safe, portable, bit-exact checkpoints for torchao-quantized PyTorch models."""

__version__ = "0.1.0"

from .api import (  # noqa: E402
    CheckpointInfo,
    TensorInfo,
    VerifyReport,
    inspect,
    load_quantized,
    pack,
    save,
    unpack,
    verify,
)
from .pretrained import load_pretrained, save_pretrained  # noqa: E402
from .safe_load import safe_load  # noqa: E402
from .errors import (  # noqa: E402
    AockptError,
    CorruptCheckpointError,
    HubError,
    KeyMismatchError,
    OutputError,
    PortabilityError,
    UnsafeCheckpointError,
    UnsupportedTensorError,
    UsageError,
)

__all__ = [
    "__version__",
    "pack",
    "save",
    "save_pretrained",
    "load_pretrained",
    "safe_load",
    "unpack",
    "load_quantized",
    "inspect",
    "verify",
    "CheckpointInfo",
    "TensorInfo",
    "VerifyReport",
    "AockptError",
    "CorruptCheckpointError",
    "HubError",
    "KeyMismatchError",
    "OutputError",
    "PortabilityError",
    "UnsafeCheckpointError",
    "UnsupportedTensorError",
    "UsageError",
]
