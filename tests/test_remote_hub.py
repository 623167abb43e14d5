"""Loading Hub repos by id, against the local Hub server (tests/hub_server.py) through real huggingface_hub."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig, quantize_

sys.path.insert(0, str(Path(__file__).parent))

import aockpt  # noqa: E402
from aockpt import hub  # noqa: E402
from aockpt.plan import Split  # noqa: E402
from aockpt.errors import CorruptCheckpointError, RemoteReadError, UsageError  # noqa: E402
from fault_proxy import FaultProxy  # noqa: E402
from hub_server import HubServer  # noqa: E402

REPO = "me/tiny-int8"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> HubServer:
    """A Hub on 127.0.0.1 that huggingface_hub reaches through HF_ENDPOINT and HF_TOKEN, cache in tmp."""
    with HubServer(lifetime_s=120) as s:
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setenv("HF_ENDPOINT", s.endpoint)
        monkeypatch.setenv("HF_TOKEN", s.token)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield s


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    quantize_(model, Int8WeightOnlyConfig())
    return model.state_dict()


def _push(server: HubServer, tmp_path: Path, seed: int = 0, name: str = "packed") -> Path:
    folder = aockpt.save(_state(seed), tmp_path / name, max_shard_size=20_000)
    (folder / "config.json").write_text('{"model_type": "tiny"}')
    hub.push(folder, REPO, endpoint=server.endpoint, token=server.token, progress=False)
    return folder


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        fa, fb = aockpt.codec.flatten(name, a[name]), aockpt.codec.flatten(name, b[name])
        assert type(a[name]) is type(b[name]) and fa.attrs == fb.attrs, name
        for inner, part in fa.parts.items():
            assert torch.equal(part.view(torch.uint8), fb.parts[inner].view(torch.uint8)), (name, inner)


def _sent(server: HubServer, since: int, suffix: str = ".safetensors") -> int:
    """File bytes the server sent for files ending in `suffix` since request number `since`."""
    return sum(r.sent for r in server.requests[since:] if r.path.endswith(suffix))


def test_the_card_load_line_works_exactly_as_written(server, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM, TorchAoConfig

    from conftest import tiny_config

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base",
                                                 quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    hub.push_to_hub(model, REPO, endpoint=server.endpoint, token=server.token, progress=False)
    card = server.files(REPO)["README.md"].decode()
    line = f'model = aockpt.load_pretrained("{REPO}", device="cpu", verify=True)'
    assert line in card and "checks every tensor's sha256 digest" in card
    loaded = aockpt.load_pretrained(REPO, device="cpu", verify=True)  # the card's line, as written
    assert isinstance(loaded.model.layers[0].mlp.up_proj.weight, Int8Tensor)
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_every_entry_point_takes_a_repo_id(server, tmp_path):
    folder = _push(server, tmp_path)
    local = aockpt.load_quantized(folder)
    _same(aockpt.load_quantized(REPO, verify=True), local)
    _same(aockpt.load_quantized(f"hf://{REPO}@main"), local)
    assert aockpt.verify(REPO).tensors == len(local)
    _same(aockpt.load_quantized(aockpt.pack(REPO, tmp_path / "repacked")), local)
    assert {t.name for t in aockpt.inspect(f"{REPO}@main").tensors} == set(local)


def test_inspect_and_keys_read_ranges_not_the_cache(server, tmp_path):
    folder = _push(server, tmp_path)
    stored = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    headers = sum(8 + int.from_bytes(p.read_bytes()[:8], "little") for p in folder.glob("*.safetensors"))
    start = len(server.requests)
    aockpt.inspect(REPO)
    assert _sent(server, start) == headers < stored
    assert not (tmp_path / "hf_home" / "hub").exists()  # nothing was put in the cache
    start = len(server.requests)
    out = aockpt.load_quantized(REPO, keys=["2.bias"], verify=True)
    assert torch.equal(out["2.bias"], aockpt.load_quantized(folder)["2.bias"])
    assert _sent(server, start) == headers + 64 * 4


def test_tp_ranks_read_their_slices_from_the_hub(server, tmp_path):
    folder = _push(server, tmp_path)
    full = aockpt.load_quantized(folder)["0.weight"].dequantize()
    for rank in range(2):
        local = aockpt.load_quantized(REPO, shard=aockpt.TPShard({"0": "colwise"}, rank, 2), keys=["0.weight"])
        cut = Split(0, rank, 2).cut(full.shape[0])
        assert torch.equal(local["0.weight"].dequantize(), full[cut.start:cut.stop])


def test_one_commit_for_the_whole_load_even_when_the_branch_moves(server, tmp_path, monkeypatch):
    old = _push(server, tmp_path)
    with FaultProxy(server.endpoint, [lambda: _push(server, tmp_path, seed=1, name="new")]) as proxy:
        monkeypatch.setenv("HF_ENDPOINT", proxy.endpoint)
        out = aockpt.load_quantized(REPO, keys=lambda n: n.endswith("weight"))
    assert len(server.repos[REPO].commits) == 2  # the branch moved after the load opened
    _same(out, {k: v for k, v in aockpt.load_quantized(old).items() if k.endswith("weight")})


def test_offline_loads_come_from_the_cache(server, tmp_path, monkeypatch):
    folder = _push(server, tmp_path)
    aockpt.load_quantized(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = len(server.requests)
    _same(aockpt.load_quantized(REPO), aockpt.load_quantized(folder))
    assert len(server.requests) == start
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    with pytest.raises(RemoteReadError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        aockpt.load_quantized(REPO)


def test_a_tampered_file_on_the_hub_fails_verify(server, tmp_path):
    folder = _push(server, tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    repo = server.repos[REPO]
    repo.branches["main"][shard.name] = bytes(data)  # the stored bytes change under the same commit
    repo.snapshots[repo.heads["main"]][shard.name] = bytes(data)
    for load in (lambda: aockpt.load_quantized(REPO, keys=lambda n: True, verify=True),
                 lambda: aockpt.load_quantized(REPO, verify=True)):
        with pytest.raises(CorruptCheckpointError, match="do not match their recorded digest"):
            load()


@pytest.mark.parametrize("where,says", [
    ("me/missing", r"^me/missing is not a local path, and http://127\.0\.0\.1:\d+ has no model repo me/missing"),
    ("me/tiny-int8@nope", r"the repo has no revision 'nope'"),
    ("./not/here", r"^\./not/here does not exist; pass an existing file or folder, a Hub repo id"),
])
def test_what_is_neither_a_path_nor_a_repo_is_one_usage_line(server, tmp_path, where, says):
    _push(server, tmp_path)
    for call in (aockpt.load_quantized, aockpt.inspect, aockpt.load_pretrained):
        with pytest.raises(UsageError, match=says) as error:
            call(where)
        assert "\n" not in str(error.value) and not re.search("corrupt", str(error.value), re.I)


def test_a_hub_that_cannot_be_reached_is_one_remote_read_line(tmp_path, monkeypatch):
    """No server at HF_ENDPOINT (a closed port on 127.0.0.1): the HTTP client's connection error becomes one
    RemoteReadError line naming the repo and endpoint, exit 9 in the CLI, never an internal error."""
    import socket

    from click.testing import CliRunner

    from aockpt.cli import EXIT_CODES, main

    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for call in (aockpt.load_quantized, aockpt.inspect):
        with pytest.raises(RemoteReadError, match=rf"^hf://me/unreachable: {re.escape(endpoint)} could not be read"):
            call("me/unreachable")
    result = CliRunner().invoke(main, ["inspect", "me/unreachable"])
    assert result.exit_code == EXIT_CODES[RemoteReadError][0] and len(result.stderr.strip().splitlines()) == 1
