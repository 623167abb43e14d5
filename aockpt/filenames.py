"""File names aockpt knows (kept free of torch imports, for the CLI's start-up and the git hook): the
safetensors weights and index it writes, and the pickle files it reads and never writes or publishes."""

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".tar"})
