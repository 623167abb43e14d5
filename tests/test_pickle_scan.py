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
