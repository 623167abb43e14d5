"""Digest throughput on this machine, for choosing the checkpoint integrity hash.

Usage: python benchmarks/digest_speed.py [--mb 512] [--repeat 3]
Hashes one buffer of random bytes in 64 MB chunks (as the writer does) with sha256 and blake2b from
hashlib, and blake3 / xxh3_128 when those packages are installed; prints GB/s (best of --repeat).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import time
from typing import Callable

CHUNK = 64 * 1024 * 1024


def _optional(module: str, factory: str) -> Callable[[], object] | None:
    """A hasher factory from an optional package, None where it is not installed."""
    try:
        return getattr(importlib.import_module(module), factory)
    except ImportError:
        return None


HASHERS: dict[str, Callable[[], object] | None] = {
    "sha256 (hashlib/OpenSSL)": hashlib.sha256,
    "blake2b (hashlib)": hashlib.blake2b,
    "blake3 (blake3 package, 1 thread)": _optional("blake3", "blake3"),
    "xxh3_128 (xxhash package, not cryptographic)": _optional("xxhash", "xxh3_128"),
}


def throughput(factory: Callable[[], object], data: memoryview, repeat: int) -> float:
    """Best GB/s over `repeat` passes."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        hasher = factory()
        for at in range(0, len(data), CHUNK):
            hasher.update(data[at:at + CHUNK])
        hasher.digest()
        best = min(best, time.perf_counter() - start)
    return len(data) / best / 1e9


def main() -> None:
    """Print one line per available hasher."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    data = memoryview(os.urandom(args.mb * 1024 * 1024))
    for name, factory in HASHERS.items():
        result = f"{throughput(factory, data, args.repeat):6.2f} GB/s" if factory else "not installed"
        print(f"{name:46s} {result}")


if __name__ == "__main__":
    main()
