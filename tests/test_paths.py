"""The containment rule: every file a model folder names or holds must really live inside it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import aockpt
from aockpt import hub
from aockpt.errors import AockptError, UnsafeCheckpointError
from conftest import CASES

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer  # noqa: E402

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- not a model"


def _state() -> dict[str, torch.Tensor]:
    return {"w": CASES["int8-weight-only"][1](), "b": torch.arange(4, dtype=torch.float32)}


def _folder(tmp_path: Path, kind: str) -> Path:
    """A model folder in one of the layouts aockpt reads, with a config.json and a notes file."""
    folder = tmp_path / "model"
    if kind == "packed":
        aockpt.save(_state(), folder)
    elif kind == "sharded":
        aockpt.save({f"l{i}": CASES["int8-weight-only"][1]() for i in range(3)}, folder, max_shard_size=20_000)
    elif kind == "pickle":
        folder.mkdir()
        torch.save(_state(), folder / "pytorch_model.bin")
    elif kind == "pickle-sharded":
        folder.mkdir()
        torch.save(_state(), folder / "part-1.bin")
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "part-1.bin",
                                                                                          "b": "part-1.bin"}}))
    (folder / "config.json").write_text("{}")
    (folder / "notes.txt").write_text("mine")
    return folder


def _relink_outside(folder: Path, name: str, tmp_path: Path) -> None:
    """Replace a folder's file by a link to a same-content copy outside the folder."""
    outside = tmp_path / "outside" / name
    outside.parent.mkdir(exist_ok=True)
    outside.write_bytes((folder / name).read_bytes())
    (folder / name).unlink()
    (folder / name).symlink_to(outside)


CASES_OUTSIDE = [
    ("packed", "model.safetensors"), ("packed", "config.json"), ("packed", "notes.txt"),
    ("sharded", "model.safetensors.index.json"), ("sharded", "model-00001-of-00002.safetensors"),
    ("pickle", "pytorch_model.bin"), ("pickle-sharded", "pytorch_model.bin.index.json"),
    ("pickle-sharded", "part-1.bin"),
]


@pytest.mark.parametrize("kind,name", CASES_OUTSIDE, ids=[f"{k}-{n}" for k, n in CASES_OUTSIDE])
def test_a_file_linked_outside_the_folder_is_refused_everywhere(tmp_path, kind, name):
    folder = _folder(tmp_path, kind)
    if not (folder / name).exists():  # the sharded layout names its shards by count
        name = sorted(p.name for p in folder.glob("model-*.safetensors"))[0]
    _relink_outside(folder, name, tmp_path)
    for run in (aockpt.load_quantized, aockpt.inspect, lambda f: aockpt.pack(f, tmp_path / "dst")):
        with pytest.raises(AockptError, match=rf"{name} points outside .*copy the file into the folder"):
            run(folder)
    assert not (tmp_path / "dst").exists()


def test_links_that_stay_inside_the_folder_are_followed(tmp_path):
    folder = _folder(tmp_path, "packed")
    (folder / "notes.txt").rename(folder / "real-notes.txt")
    (folder / "notes.txt").symlink_to("real-notes.txt")
    aockpt.pack(folder, tmp_path / "dst")
    assert (tmp_path / "dst" / "notes.txt").read_text() == "mine"


def test_push_never_uploads_a_file_linked_outside_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("AOCKPT_NO_PROGRESS", "1")
    folder = _folder(tmp_path, "packed")
    (tmp_path / "id_rsa").write_bytes(SECRET)
    (folder / "notes.txt").unlink()
    (folder / "notes.txt").symlink_to(tmp_path / "id_rsa")
    with HubServer(lifetime_s=60) as server:
        with pytest.raises(UnsafeCheckpointError, match="notes.txt: a link outside the folder"):
            hub.push(folder, "me/x", endpoint=server.endpoint, token=server.token, progress=False)
        assert server.requests == []


def test_push_refuses_a_huge_card_before_reading_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    folder = _folder(tmp_path, "packed")
    with open(folder / "README.md", "wb") as f:
        f.truncate(4 * 1024**3)  # sparse
    with HubServer(lifetime_s=60) as server:
        with pytest.raises(aockpt.UsageError, match="README.md is 4,294,967,296 bytes, more than a model card's"):
            hub.push(folder, "me/x", endpoint=server.endpoint, token=server.token, progress=False)
        assert server.requests == []
