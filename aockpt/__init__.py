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
    save_pretrained,
    unpack,
    verify,
)
from .errors import (  # noqa: E402
    AockptError,
    CorruptCheckpointError,
    HubError,
    KeyMismatchError,
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
    "PortabilityError",
    "UnsafeCheckpointError",
    "UnsupportedTensorError",
    "UsageError",
]
