"""The pickle scan: budgets enforced before torch's unpickler runs anything."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from aockpt import pickle_scan
from aockpt.errors import CorruptCheckpointError
from aockpt.unpickle import safe_load

sys.path.insert(0, str(Path(__file__).parent))
import hostile  # noqa: E402


def test_pickle_opcode_budget_refuses_before_torch_runs_it(tmp_path, monkeypatch):
    monkeypatch.setattr(pickle_scan, "_MAX_OPCODES", 10_000)
    bomb = hostile.program(hostile.d(*[(hostile.s(f"k{n}"), b"N") for n in range(6_000)]))
    for container, data in (("zip", hostile.zip_bytes(bomb)), ("legacy", hostile.legacy_bytes(bomb))):
        path = tmp_path / f"{container}.pt"
        path.write_bytes(data)
        with pytest.raises(CorruptCheckpointError, match="more than 10,000 opcodes"):
            safe_load(path)


def test_argument_lengths_and_text_lines_are_bounded_by_what_the_stream_holds():
    """A length field asking for more bytes than remain is refused before any buffer is allocated; a text
    opcode's line is read at most _MAX_LINE bytes at a time (a legacy file may hold gigabytes after it)."""
    import io

    data = b"c" + b"m" * (pickle_scan._MAX_LINE * 2)
    stream = pickle_scan._BoundedReader(io.BytesIO(data), len(data))
    assert stream.read(1) == b"c" and len(stream.readline()) == pickle_scan._MAX_LINE
    with pytest.raises(ValueError, match="claims 4,294,967,295 bytes"):
        stream.read(2**32 - 1)
