"""The CLI: each verb works, and every user mistake is one line on stderr with no traceback."""

import json

import pytest
import torch
from click.testing import CliRunner

import aockpt
from aockpt import format as fmt
from aockpt.cli import main
from conftest import CASES


@pytest.fixture
def packed(tmp_path):
    aockpt.save({"m.weight": CASES["int8-weight-only"][1](), "m.bias": torch.ones(64)}, tmp_path / "p")
    return tmp_path / "p"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output + (result.stderr or "")
    return result


def test_inspect_table_and_json(packed):
    table = run("inspect", packed, "--device", "cpu")
    assert table.exit_code == 0
    assert "Int8Tensor" in table.output and "runs: portable" in table.output and "x smaller" in table.output
    data = json.loads(run("inspect", packed, "--json").output)
    assert {t["name"] for t in data["tensors"]} == {"m.weight", "m.bias"} and data["total_bytes"] > 0


def test_verify_ok_and_corrupt(packed):
    assert run("verify", packed).exit_code == 0
    path = packed / fmt.WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    result = run("verify", packed)
    assert result.exit_code == 4 and "m.weight (part zero_point)" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_pack_unpack_round_trip(packed, tmp_path):
    assert run("unpack", packed, tmp_path / "x.pt").exit_code == 0
    result = run("pack", tmp_path / "p", tmp_path / "again")
    assert result.exit_code == 0 and "packed 2 tensors" in result.output
    a, b = aockpt.load_quantized(packed), aockpt.load_quantized(tmp_path / "again")
    assert torch.equal(a["m.weight"].qdata, b["m.weight"].qdata)


@pytest.mark.parametrize("args, code, message", [
    (["pack", "{p}", "{p}"], 2, "already exists"),
    (["inspect", "{t}/missing"], 2, "does not exist"),
    (["inspect", "{t}/junk.safetensors"], 4, "too short"),
    (["inspect", "{p}", "--device", "gpu"], 2, "not a device"),
])
def test_errors_are_one_line(packed, tmp_path, args, code, message):
    (tmp_path / "junk.safetensors").write_bytes(b"\x01")
    result = run(*[a.format(p=packed, t=tmp_path) for a in args])
    assert result.exit_code == code, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_help_teaches_with_examples():
    for verb in ("pack", "unpack", "inspect", "verify"):
        result = run(verb, "--help")
        assert result.exit_code == 0 and "Example" in result.output or verb == "verify"
