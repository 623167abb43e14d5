"""Fuzzing: mutated packed and torchao checkpoints give an AockptError or a correct result, never anything else.

Each example copies a small valid checkpoint (two shards, an index, an int8, a float8, a plain and a tied
tensor), applies one seeded mutation, and runs inspect, load_quantized and verify on it.
benchmarks/fuzz_deep.py runs the same mutations for minutes.
"""

from __future__ import annotations

import json
import random
import re
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aockpt
from aockpt import format as fmt
from aockpt.errors import AockptError, CorruptCheckpointError, printable
from conftest import CASES

Files = dict[str, bytes]  # file name in the checkpoint folder -> contents

# Values that break assumptions: wrong types, huge and negative numbers, typed-JSON lookalikes.
PALETTE: list[Any] = [
    None, True, 0, -1, 1, 2**31, 2**64, 1.5, "", "x", "..", "/etc/passwd", "Int8Tensor", "Tensor", "__metadata__",
    [], [0], [-1, 2], [2**62, 2**62], {}, {"_type": "torch.dtype", "_data": "int8"}, {"_type": "os.system"},
    {"_type": "tuple", "_data": [1, 2]}, {"alias_of": "w8"}, "[]", "{}",
    # second round (docs/security.md): huge shapes, format keys as names, control characters, long versions,
    # junk int4 geometry and kwargs fields
    2**63, [2**63, 1], {"_type": "torch.Size", "_data": [2**63]}, "aockpt", "tensor_names", "int4", [1, 0],
    "w\nTraceback (most recent call last):\x1b]0;x\x07\r", "1" * 5000 + ".0.0",
    {"_type": "PerRow", "_data": {"dim": "x"}}, {"_type": "QuantizeTensorToInt8Kwargs", "_data": {"granularity": "PerFoo"}},
]


def make_templates(folder: Path) -> dict[str, Files]:
    """A small two-shard packed checkpoint, and the same files as torchao/transformers would see them."""
    state = {"w8": CASES["int8-weight-only"][1](), "f8": CASES["float8-weight-only"][1](),
             "i4": CASES["int4-opaque"][1](), "bias": torch.arange(6, dtype=torch.float32)}
    state["tied"] = state["bias"]
    aockpt.save(state, folder / "packed", max_shard_size=12_000)
    packed = {p.name: p.read_bytes() for p in sorted((folder / "packed").iterdir())}
    torchao = {name: _without_record(data) if name.endswith(".safetensors") else data
               for name, data in packed.items()}
    return {"packed": packed, "torchao": torchao}


def _split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's header JSON and its data bytes."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def _join(header: dict, data: bytes) -> bytes:
    """A safetensors file from a header and data (offsets are relative to the data, so they stay valid)."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _without_record(data: bytes) -> bytes:
    """The shard with aockpt's record removed, as a torchao-written file looks."""
    header, rest = _split(data)
    del header["__metadata__"][fmt.RECORD_KEY]
    return _join(header, rest)


def _shards(files: Files) -> list[str]:
    return sorted(n for n in files if n.endswith(".safetensors"))


def _mutate_tree(value: Any, rng: random.Random) -> Any:
    """Replace, delete or add one node somewhere in a JSON tree; returns the new tree."""
    slots: list[tuple[Any, Any]] = [(None, None)]
    stack = [value]
    while stack:
        node = stack.pop()
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in children:
            slots.append((node, key))
            stack.append(child)
    parent, key = rng.choice(slots)
    new = rng.choice(PALETTE)
    if parent is None:
        return new
    action = rng.randrange(3)
    if action == 0:
        parent[key] = new
    elif action == 1:
        del parent[key]
    elif isinstance(parent, dict):
        parent[rng.choice(["extra", "_type", "alias_of", *map(str, parent)]) + rng.choice(["", "2"])] = new
    else:
        parent.insert(key, new)
    return value


def _header_byte(files: Files, rng: random.Random) -> None:
    """Overwrite one byte of a shard's length prefix or header."""
    name = rng.choice(_shards(files))
    data = bytearray(files[name])
    (length,) = struct.unpack("<Q", data[:8])
    data[rng.randrange(8 + length)] = rng.randrange(256)
    files[name] = bytes(data)


def _header_splice(files: Files, rng: random.Random) -> None:
    """Insert or delete a few header bytes, keeping or fixing the length prefix."""
    name = rng.choice(_shards(files))
    data = files[name]
    (length,) = struct.unpack("<Q", data[:8])
    at = rng.randrange(8, 8 + length)
    junk = bytes(rng.choice(b'{}[]",:0123456789-eE.\\ \x00\xff') for _ in range(rng.randrange(1, 4)))
    cut = rng.randrange(0, 4)
    body = data[8:at] + (junk if rng.random() < 0.5 else b"") + data[at + cut:8 + length]
    prefix = struct.pack("<Q", len(body)) if rng.random() < 0.7 else data[:8]
    files[name] = prefix + body + data[8 + length:]


def _metadata_json(files: Files, rng: random.Random) -> None:
    """Mutate one JSON value of a shard's metadata: the aockpt record, a torchao record or tensor_names."""
    name = rng.choice(_shards(files))
    header, rest = _split(files[name])
    meta = header["__metadata__"]
    key = rng.choice(sorted(meta))
    try:
        meta[key] = json.dumps(_mutate_tree(json.loads(meta[key]), rng))
    except ValueError:
        meta[key] = rng.choice(["", "{", "null", json.dumps(rng.choice(PALETTE))])
    files[name] = _join(header, rest)


def _header_json(files: Files, rng: random.Random) -> None:
    """Mutate the safetensors header itself: entries, shapes, offsets, dtypes, metadata keys."""
    name = rng.choice(_shards(files))
    header, rest = _split(files[name])
    files[name] = _join(_mutate_tree(header, rng), rest)


def _index_json(files: Files, rng: random.Random) -> None:
    """Mutate the shard index."""
    files[fmt.INDEX_NAME] = json.dumps(_mutate_tree(json.loads(files[fmt.INDEX_NAME]), rng)).encode()


def _number_overflow(files: Files, rng: random.Random, literal: str = "1e999") -> None:
    """Write one number of a shard's header as 1e999, which plain json.loads reads as infinity."""
    name = rng.choice(_shards(files))
    data = files[name]
    (length,) = struct.unpack("<Q", data[:8])
    text = data[8:8 + length].decode()
    numbers = [m.span() for m in re.finditer(r"(?<![\w.])\d+(?![\w.])", text)]
    start, end = rng.choice(numbers)
    body = (text[:start] + literal + text[end:]).encode()
    files[name] = struct.pack("<Q", len(body)) + body + data[8 + length:]


def _truncate(files: Files, rng: random.Random) -> None:
    """Cut a file short (or pad it)."""
    name = rng.choice(sorted(files))
    data = files[name]
    files[name] = data[:rng.randrange(len(data))] if rng.random() < 0.8 else data + bytes(rng.randrange(1, 16))


def _remove(files: Files, rng: random.Random) -> None:
    """Delete one file of the checkpoint."""
    del files[rng.choice(sorted(files))]


def _data_flip(files: Files, rng: random.Random) -> None:
    """Flip one bit of tensor data: the structure stays valid, only digests can tell."""
    name = rng.choice(_shards(files))
    data = bytearray(files[name])
    (length,) = struct.unpack("<Q", data[:8])
    at = rng.randrange(8 + length, len(data))
    data[at] ^= 1 << rng.randrange(8)
    files[name] = bytes(data)


MUTATIONS: dict[str, Callable[[Files, random.Random], None]] = {
    "header-byte": _header_byte, "header-splice": _header_splice, "metadata-json": _metadata_json,
    "header-json": _header_json, "index-json": _index_json, "truncate": _truncate, "remove": _remove,
    "data-flip": _data_flip, "number-overflow": _number_overflow,
    # third round: `-0`, which Python reads as 0 and the reference safetensors reader refuses
    "minus-zero": lambda files, rng: _number_overflow(files, rng, "-0"),
}
OPERATIONS: dict[str, Callable[[Path], Any]] = {
    "inspect": aockpt.inspect, "load_quantized": aockpt.load_quantized, "verify": aockpt.verify,
}


def check_mutant(templates: dict[str, Files], flavor: str, mutation: str, seed: int) -> dict[str, str]:
    """Apply one mutation and run every operation; returns each outcome, raising on any non-AockptError."""
    files = dict(templates[flavor])
    MUTATIONS[mutation](files, random.Random(seed))
    outcomes = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        for op, run in OPERATIONS.items():
            try:
                run(folder)
                outcomes[op] = "ok"
            except AockptError as e:
                assert str(e) and printable(str(e)) == str(e) and len(str(e)) < 2000, (op, e)
                outcomes[op] = type(e).__name__
    if mutation == "data-flip" and flavor == "packed":
        assert outcomes["verify"] == CorruptCheckpointError.__name__, outcomes
    return outcomes


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Files]:
    return make_templates(tmp_path_factory.mktemp("fuzz"))


def test_templates_are_valid(templates):
    for flavor in templates:
        assert set(check_mutant({"t": templates[flavor]}, "t", "remove", 0)) == set(OPERATIONS)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in templates["packed"].items():
            (Path(tmp) / name).write_bytes(data)
        assert len(_shards(templates["packed"])) >= 2 and fmt.INDEX_NAME in templates["packed"]
        assert aockpt.verify(tmp).tensors == 5


FUZZ = settings(derandomize=True, database=None, deadline=2000, max_examples=1500,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(mutation=st.sampled_from(sorted(MUTATIONS)), seed=st.integers(0, 2**32 - 1))
def test_mutated_packed_checkpoint(templates, mutation, seed):
    check_mutant(templates, "packed", mutation, seed)


@FUZZ
@given(mutation=st.sampled_from(sorted(MUTATIONS)), seed=st.integers(0, 2**32 - 1))
def test_mutated_torchao_checkpoint(templates, mutation, seed):
    check_mutant(templates, "torchao", mutation, seed)


# Found by benchmarks/fuzz_deep.py: (flavor, mutation, seed, what it raised before the fix).
REGRESSIONS = [
    ("packed", "header-byte", 1000134, "KeyError: a plain tensor's part renamed, read_flat indexed 'data'"),
    ("packed", "header-splice", 1000733, "KeyError, same"),
    ("packed", "metadata-json", 1000959, "KeyError, same"),
]


@pytest.mark.parametrize("flavor, mutation, seed, was", REGRESSIONS)
def test_fuzz_regressions(templates, flavor, mutation, seed, was):
    check_mutant(templates, flavor, mutation, seed)
