"""On-disk layout rules: keys, records, index names, determinism, and old files read by this reader."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import aockpt
from aockpt import format as fmt
from aockpt.errors import CorruptCheckpointError
from conftest import CASES

FIXTURES = Path(__file__).parent.parent / "fixtures" / "format"


@pytest.mark.parametrize("name, inner, key", [
    ("model.layers.0.proj.weight", "qdata", "model.layers.0.proj._weight_qdata"),
    ("weight", "scale", "_weight_scale"),
])
def test_part_key_follows_torchao(name, inner, key):
    assert fmt.part_key(name, inner) == key


@pytest.mark.parametrize("name", ["../evil.safetensors", "/abs.safetensors", "a/b.safetensors", "C:x", "..",
                                  "a\\b", "nul\x00.safetensors", "", 3])
def test_index_shard_names_stay_inside_the_folder(name):
    with pytest.raises(CorruptCheckpointError, match="plain file name"):
        fmt.index_from_json(json.dumps({"weight_map": {"a": name}}), "index")


@pytest.mark.parametrize("version, ok", [("1.0.0", True), ("1.7.2", True), ("2.0.0", False), ("1.0", False),
                                         (1, False)])
def test_format_versions(version, ok):
    if ok:
        assert fmt.check_version(version, "f") == version
    else:
        with pytest.raises(CorruptCheckpointError):
            fmt.check_version(version, "f")


def _record(tmp_path):
    aockpt.save({"w": CASES["int8-weight-only"][1]()}, tmp_path / "p")
    from aockpt.safetensors_io import SafetensorsFile

    with SafetensorsFile(tmp_path / "p" / fmt.WEIGHTS_NAME) as f:
        return json.loads(f.metadata[fmt.RECORD_KEY])


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(extra=1), "expected keys"),
    (lambda r: r["tensors"]["w"].update(type=7), "unexpected value"),
    (lambda r: r["tensors"]["w"].update(dtype="evil"), "unexpected value"),
    (lambda r: r["tensors"]["w"]["parts"]["qdata"].pop("digest"), "expected keys"),
    (lambda r: r["tensors"]["w"].update(shape=[-1]), "non-negative"),
    (lambda r: r.update(format_version="9.0.0"), "upgrade aockpt"),
    (lambda r: r.update(digest="md5"), "digest algorithm"),
])
def test_record_parser_refuses(tmp_path, mutate, message):
    record = _record(tmp_path)
    mutate(record)
    with pytest.raises(CorruptCheckpointError, match=message):
        fmt.record_from_json(json.dumps(record), "r")


def test_output_does_not_depend_on_dict_order(tmp_path):
    q, b = CASES["int8-dynamic"][1](), torch.ones(3)
    aockpt.save({"a.weight": q, "a.bias": b}, tmp_path / "one")
    aockpt.save({"a.bias": b, "a.weight": q}, tmp_path / "two")
    one, two = (tmp_path / d / fmt.WEIGHTS_NAME for d in ("one", "two"))
    assert one.read_bytes() == two.read_bytes()


def test_format_1_0_0_file_reads_exactly():
    """Old file, new reader: a committed file written by format 1.0.0."""
    expected = load_file(FIXTURES / "v1.0.0.expected.safetensors")
    state = aockpt.load_quantized(FIXTURES / "v1.0.0", verify=True)
    assert state["tied"] is state["0.weight"]
    for name in ("0.weight", "1.weight"):
        assert torch.equal(state[name].dequantize(), expected[f"{name}.dequantized"])
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16)).to(torch.bfloat16)
    model.load_state_dict({k: v for k, v in state.items() if k != "tied"}, assign=True)
    with torch.no_grad():
        assert torch.equal(model(expected["input"]), expected["output"])


def test_sharded_checkpoint_in_the_hugging_face_cache_layout_loads(tmp_path):
    """snapshots/<rev>/ holds links into ../../blobs: the one place shards may live outside their folder."""
    state = {f"layers.{i}.weight": CASES["int8-weight-only"][1]() for i in range(3)}
    aockpt.save(state, tmp_path / "p", max_shard_size=20_000)
    repo = tmp_path / "hub" / "models--me--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted((tmp_path / "p").iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "blobs" / "cfg").write_text("{}")
    (snapshot / "config.json").symlink_to(Path("..") / ".." / "blobs" / "cfg")
    loaded = aockpt.load_quantized(snapshot, verify=True)
    assert sorted(loaded) == sorted(state)
    aockpt.pack(snapshot, tmp_path / "repacked")
    assert (tmp_path / "repacked" / "config.json").read_text() == "{}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for f in sorted((tmp_path / "p").iterdir()):
        (elsewhere / f.name).symlink_to(f)
    with pytest.raises(CorruptCheckpointError, match="points outside"):
        aockpt.load_quantized(elsewhere)


def test_format_1_0_0_file_passes_verify():
    """Old file, new verify: digests, structure and torchao records of a committed 1.0.0 file."""
    assert aockpt.verify(FIXTURES / "v1.0.0").tensors == 5
