"""Names of the pickle files aockpt reads and never writes or publishes (kept free of torch imports)."""

PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".tar"})
