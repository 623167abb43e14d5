"""aockpt.hub against a real HTTP Hub API on 127.0.0.1 (tests/hub_server.py) and real git repositories."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import torchao
from click.testing import CliRunner
from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig, quantize_

sys.path.insert(0, str(Path(__file__).parent))

import aockpt  # noqa: E402
from aockpt import hook, hub, publish_rules  # noqa: E402
from aockpt.cli import main  # noqa: E402
from aockpt.errors import HubError, UnsafeCheckpointError, UsageError  # noqa: E402
from hub_server import HubServer  # noqa: E402

REPO = "me/tiny-int8"
EXISTING_CARD = "---\nlicense: mit\ntags:\n- mine\n---\n# Tiny model\n\nHand-written text that must survive.\n"


@pytest.fixture(autouse=True)
def _hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No Xet (the test server speaks LFS only), no saved token, no progress bars."""
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("AOCKPT_NO_PROGRESS", "1")


@pytest.fixture
def server() -> HubServer:
    with HubServer(lifetime_s=60) as s:
        yield s


def _state_dict() -> dict[str, torch.Tensor]:
    """A real torchao 0.18 int8 weight-only model's state dict (two Int8Tensor weights, plain biases)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    quantize_(model, Int8WeightOnlyConfig())
    state = model.state_dict()
    assert isinstance(state["0.weight"], Int8Tensor)
    return state


@pytest.fixture
def pickle_folder(tmp_path: Path) -> Path:
    """A transformers-style folder holding a torch pickle: pytorch_model.bin + config.json + a card."""
    src = tmp_path / "pickle_model"
    src.mkdir()
    torch.save(_state_dict(), src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 64}))
    (src / "README.md").write_text(EXISTING_CARD)
    return src


@pytest.fixture
def packed(tmp_path: Path) -> Path:
    """A packed folder made by aockpt.save, with a config.json."""
    folder = aockpt.save(_state_dict(), tmp_path / "packed")
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    return folder


def _push(server: HubServer, path: Path, **options) -> str:
    return hub.push(path, REPO, endpoint=server.endpoint, token=server.token, progress=False, **options)


# --- push ------------------------------------------------------------------------------------------

def test_push_of_a_pickle_folder_uploads_exactly_the_packed_files(server, pickle_folder, tmp_path):
    url = _push(server, pickle_folder)

    expected = aockpt.pack(pickle_folder, tmp_path / "expected")
    arrived = server.files(REPO)
    assert sorted(arrived) == ["README.md", "config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors"):
        assert arrived[name] == (expected / name).read_bytes(), name
    assert url == f"{server.endpoint}/{REPO}/commit/{server.repos[REPO].commits[-1]['oid']}"
    assert not any(b.startswith(b"PK\x03\x04") for b in server.lfs_objects.values())
    assert [p for p in server.paths("PUT")] == [f"/lfs-objects/{o}" for o in server.lfs_objects]

    # What arrived is a checkpoint that verifies and loads back to the original int8 bytes.
    download = tmp_path / "download"
    download.mkdir()
    for name, data in arrived.items():
        (download / name).write_bytes(data)
    assert aockpt.verify(download).tensors == 4
    loaded = aockpt.load_quantized(download, "cpu")
    original = _state_dict()
    for name in ("0.weight", "2.weight"):
        assert isinstance(loaded[name], Int8Tensor)
        assert torch.equal(loaded[name].qdata, original[name].qdata)
        assert torch.equal(loaded[name].scale.view(torch.uint8), original[name].scale.view(torch.uint8))


def test_card_keeps_existing_text_and_describes_the_quantization(server, pickle_folder):
    _push(server, pickle_folder)
    card = server.files(REPO)["README.md"].decode()
    meta = huggingface_hub.ModelCard(card).data
    assert set(meta.tags) == {"mine", "aockpt", "torchao"} and meta.license == "mit"
    assert "# Tiny model\n\nHand-written text that must survive." in card
    assert "| `0.weight` | Int8Tensor | float32 | 1 |" in card and "| `0.bias` | Tensor | float32 | 1 | 128 |" in card
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}")' in card
    assert f'aockpt.load_pretrained("{REPO}"' in card
    assert "| cpu | 4 | 0 | 0 |" in card
    assert f"| torchao | {torchao.__version__} |" in card


def test_card_section_is_replaced_not_duplicated(packed):
    info = aockpt.inspect(packed, devices=hub.CARD_DEVICES)
    once = hub.model_card(EXISTING_CARD, info, REPO)
    twice = hub.model_card(once + "\nText added below on the Hub.\n", info, REPO)
    assert once.count(hub.SECTION_BEGIN) == 1 and twice.count(hub.SECTION_BEGIN) == 1
    assert twice.count("## aockpt quantization") == 1
    assert "Text added below on the Hub." in twice and "Hand-written text that must survive." in twice


def test_repush_of_unchanged_files_makes_no_commit_and_sends_no_bytes(server, packed):
    first = _push(server, packed)
    puts = len(server.paths("PUT"))
    second = _push(server, packed)
    assert second == first
    assert len(server.repos[REPO].commits) == 1
    assert len(server.paths("PUT")) == puts  # LFS batch answered "already present" for every object
    assert server.paths("POST")[-1] == f"/{REPO}.git/info/lfs/objects/batch"


def test_changed_config_makes_a_second_commit_with_only_new_bytes(server, packed):
    _push(server, packed)
    puts = len(server.paths("PUT"))
    (packed / "config.json").write_text(json.dumps({"model_type": "tiny", "changed": True}))
    _push(server, packed, commit_message="new config")
    repo = server.repos[REPO]
    assert [c["summary"] for c in repo.commits][-1] == "new config" and len(repo.commits) == 2
    assert len(server.paths("PUT")) == puts
    assert json.loads(server.files(REPO)["config.json"]) == {"model_type": "tiny", "changed": True}


def test_wrong_token_is_a_hub_error_about_the_token(packed):
    with HubServer(token="the-right-one") as server:
        with pytest.raises(HubError, match=r"HTTP 401: .*HF_TOKEN.*hf auth login.*no commit was made"):
            hub.push(packed, REPO, endpoint=server.endpoint, token="wrong", progress=False)
        assert server.repos == {}
        assert {r.status for r in server.requests} == {401}


def test_server_going_away_mid_upload_claims_nothing(server, packed):
    server.go_away_on("POST", r"/commit/")
    with pytest.raises(HubError, match=r"could not talk to http://127\.0\.0\.1.*no commit was made") as e:
        _push(server, packed)
    assert "\n" not in str(e.value)
    assert server.files(REPO) == {}  # the LFS object was staged, but no commit names it
    assert len(server.lfs_objects) == 1 and server.repos[REPO].commits == []


def test_push_to_a_branch_and_as_a_pull_request(server, packed):
    _push(server, packed, revision="int8")
    assert sorted(server.files(REPO, "int8")) == ["README.md", "config.json", "model.safetensors"]
    assert server.files(REPO, "main") == {}
    url = _push(server, packed, create_pr=True, commit_message="as a PR")
    assert url == f"{server.endpoint}/{REPO}/discussions/1"
    assert server.files(REPO, "main") == {}


@pytest.mark.parametrize("name, content, says", [
    ("optimizer.pt", b"anything", ".pt is a torch pickle extension"),
    ("weights.dat", b"PK\x03\x04rest-of-a-zip", "zip archive"),
    ("extra/state", pickle.dumps({"a": 1}, protocol=4), "raw pickle"),
])
def test_push_refuses_pickles_before_sending_anything(server, packed, name, content, says):
    (packed / name).parent.mkdir(exist_ok=True)
    (packed / name).write_bytes(content)
    with pytest.raises(UnsafeCheckpointError, match=rf"{name}: .*{says}"):
        _push(server, packed)
    assert server.requests == []


def test_push_refuses_a_tampered_checkpoint(server, packed):
    _flip_last_byte(packed / "model.safetensors")
    with pytest.raises(aockpt.CorruptCheckpointError, match="checkpoint folder: fails verify: .*2.weight"):
        _push(server, packed)
    assert server.requests == []


def test_push_refuses_safetensors_without_aockpt_record(server, packed):
    from safetensors.torch import save_file

    (packed / "adapter").mkdir()
    save_file({"w": torch.zeros(2)}, packed / "adapter" / "adapter.safetensors")
    with pytest.raises(UnsafeCheckpointError, match="adapter: safetensors without aockpt's record"):
        _push(server, packed)
    assert server.requests == []


def test_push_calls_a_damaged_aockpt_record_corrupt_not_unpacked(server, packed):
    """A packed folder whose aockpt record is broken is corrupt, not "safetensors without aockpt's record"."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shard = packed / "model.safetensors"
    with safe_open(shard, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, shard, metadata={**meta, "aockpt": meta["aockpt"][:-7]})
    with pytest.raises(aockpt.CorruptCheckpointError, match=r"model\.safetensors: invalid JSON .*damaged"):
        _push(server, packed)
    assert server.requests == []
    [problem] = publish_rules.find_problems(packed, publish_rules.publishable_files(packed))
    assert problem.error is aockpt.CorruptCheckpointError and "fails verify: " in problem.text


def test_push_to_hub_of_an_in_memory_model_loads_back_with_stock_transformers(server, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM, TorchAoConfig

    from conftest import tiny_config

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base",
                                                 quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    assert isinstance(model.model.layers[0].mlp.up_proj.weight, Int8Tensor)

    hub.push_to_hub(model, REPO, endpoint=server.endpoint, token=server.token, progress=False)

    download = tmp_path / "download"
    download.mkdir()
    for name, data in server.files(REPO).items():
        (download / name).write_bytes(data)
    assert sorted(server.files(REPO)) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    stock = AutoModelForCausalLM.from_pretrained(download)
    assert isinstance(stock.model.layers[1].self_attn.q_proj.weight, Int8Tensor)
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, model(ids).logits)
    card = server.files(REPO)["README.md"].decode()
    assert "| `model.layers.*.mlp.up_proj.weight` | Int8Tensor | float32 | 2 |" in card


def test_push_to_hub_refuses_what_is_neither_a_model_nor_a_folder():
    with pytest.raises(UsageError, match="cannot push a dict"):
        hub.push_to_hub({}, REPO)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# --- CLI -------------------------------------------------------------------------------------------

def test_cli_push_prints_the_commit_url(server, packed):
    result = CliRunner().invoke(main, ["push", str(packed), REPO, "--endpoint", server.endpoint,
                                       "--token", server.token, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().startswith(f"{server.endpoint}/{REPO}/commit/")


@pytest.mark.parametrize("token, says", [("wrong", "HF_TOKEN"), (None, "HF_TOKEN")])
def test_cli_push_errors_are_one_line(server, packed, token, says):
    args = ["push", str(packed), REPO, "--endpoint", server.endpoint] + (["--token", token] if token else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in result.output, result.output


def test_cli_push_refusal_is_one_line(server, packed):
    (packed / "model.bin").write_bytes(b"x")
    result = CliRunner().invoke(main, ["push", str(packed), REPO, "--endpoint", server.endpoint])
    assert result.exit_code != 0 and server.requests == []
    assert len(result.output.strip().splitlines()) == 1 and "model.bin" in result.output


# --- git pre-push hook ----------------------------------------------------------------------------

def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=check, env=env)


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """An empty bare remote and a clone of it with the aockpt hook installed through the CLI."""
    remote, work = tmp_path / "remote.git", tmp_path / "work"
    _git(tmp_path, "init", "--bare", "-b", "main", str(remote))
    _git(tmp_path, "clone", str(remote), str(work))
    result = CliRunner().invoke(main, ["hook", "install", str(work)])
    assert result.exit_code == 0, result.output
    return work


def _commit_and_push(work: Path, branch: str, files: dict[str, Path | bytes]) -> subprocess.CompletedProcess:
    _git(work, "checkout", "--orphan", branch)
    _git(work, "rm", "-r", "-q", "--cached", "--ignore-unmatch", ".")
    for name, content in files.items():
        target = work / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        else:
            target.write_bytes(content)
        _git(work, "add", name)
    _git(work, "commit", "-q", "-m", branch)
    return _git(work, "push", "origin", branch, check=False)


def test_hook_refuses_a_pickle_and_passes_a_packed_folder(clone, packed, tmp_path):
    torch.save(_state_dict(), tmp_path / "sd.bin")
    refused = _commit_and_push(clone, "bad", {"ckpt/pytorch_model.bin": tmp_path / "sd.bin",
                                              "ckpt/config.json": packed / "config.json"})
    assert refused.returncode != 0
    assert "aockpt: refused" in refused.stderr and "ckpt/pytorch_model.bin: .bin is a torch pickle" in refused.stderr
    assert _git(clone.parent / "remote.git", "branch", "--list", "bad").stdout == ""

    passed = _commit_and_push(clone, "good", {"m/model.safetensors": packed / "model.safetensors",
                                              "m/config.json": packed / "config.json"})
    assert passed.returncode == 0, passed.stderr
    remote_files = _git(clone.parent / "remote.git", "ls-tree", "-r", "--name-only", "good").stdout.split()
    assert remote_files == ["m/config.json", "m/model.safetensors"]


def test_hook_refuses_a_renamed_pickle_and_a_tampered_checkpoint(clone, packed, tmp_path):
    torch.save(_state_dict(), tmp_path / "sd.bin")
    _flip_last_byte(packed / "model.safetensors")
    refused = _commit_and_push(clone, "bad", {"weights.data": tmp_path / "sd.bin",
                                              "model.safetensors": packed / "model.safetensors"})
    assert refused.returncode != 0
    reasons = [line for line in refused.stderr.splitlines() if line.startswith("aockpt: refused")]
    assert len(reasons) == 2, refused.stderr
    assert "weights.data: a zip archive" in reasons[1] or "weights.data: a zip archive" in reasons[0]
    assert any("the checkpoint folder: fails verify" in r for r in reasons)


def test_hook_checks_every_pushed_commit_not_only_the_tip(clone, packed):
    (clone / "config.json").write_bytes((packed / "config.json").read_bytes())
    (clone / "model.pt").write_bytes(b"not even a real pickle")
    _git(clone, "add", "config.json", "model.pt")
    _git(clone, "commit", "-q", "-m", "add a pickle")
    _git(clone, "rm", "-q", "model.pt")
    _git(clone, "commit", "-q", "-m", "remove it again")
    refused = _git(clone, "push", "origin", "HEAD:main", check=False)
    assert refused.returncode != 0 and "model.pt: .pt is a torch pickle extension" in refused.stderr
    assert _git(clone.parent / "remote.git", "branch", "--list").stdout == ""


def test_hook_install_rules(tmp_path, clone):
    hook_file = clone / ".git" / "hooks" / "pre-push"
    assert hook.HOOK_MARKER in hook_file.read_text() and os.access(hook_file, os.X_OK)
    assert sys.executable in hook_file.read_text()
    assert hook.install_hook(clone) == hook_file  # re-installing our own hook needs no --force

    hook_file.write_text("#!/bin/sh\necho foreign\n")
    result = CliRunner().invoke(main, ["hook", "install", str(clone)])
    assert result.exit_code != 0 and "--force" in result.output and len(result.output.strip().splitlines()) == 1
    assert CliRunner().invoke(main, ["hook", "install", str(clone), "--force"]).exit_code == 0
    assert (clone / ".git" / "hooks" / hook.CHAINED).read_text() == "#!/bin/sh\necho foreign\n"  # tests/test_hook.py

    (tmp_path / "plain").mkdir()
    with pytest.raises(UsageError, match="is not a git repository"):
        hook.install_hook(tmp_path / "plain")


def test_the_hook_refuses_pickles_without_importing_torch():
    """Most pushes hold no checkpoint: the hook's name/magic check must not pay for torch and torchao."""
    import subprocess
    import sys

    code = ("import sys, aockpt.hook, aockpt.publish_rules as r; assert r.pickle_reason('m/x.bin', b'') "
            "and r.pickle_reason('m/y.dat', b'PK\\x03\\x04'); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("module", ["aockpt.hook", "aockpt.hub"])
def test_hooks_installed_by_any_release_still_run(module):
    """aockpt 0.1 hooks run `python -m aockpt.hub pre-push`; current ones `-m aockpt.hook`: both check the push."""
    import subprocess
    import sys

    usage = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True)
    assert usage.returncode == 2 and "pre-push" in usage.stderr
    empty = subprocess.run([sys.executable, "-m", module, "pre-push", "origin", "url"], input="",
                           capture_output=True, text=True)
    assert empty.returncode == 0, empty.stderr
