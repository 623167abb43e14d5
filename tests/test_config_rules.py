"""config.json is input: hostile configs are refused, by inspect, pack and load_pretrained alike, with one
AockptError line, in bounded time and memory, before transformers builds anything they describe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config, tiny_model

import aockpt
from aockpt.config_rules import Backing, check_buffers
from aockpt.errors import CorruptCheckpointError, UnsafeCheckpointError, UnsupportedTensorError
from aockpt.hf_config import skeleton
from torchao.quantization import Int8WeightOnlyConfig, quantize_

SECONDS, GROWTH_MB = 10, 1024  # the limits every refusal keeps (issue 20), measured per call in one process
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
HOSTILE = {  # name -> the fields set in a good config.json
    "no heads": {"num_attention_heads": 0},
    "negative size": {"hidden_size": -64},
    "junk dtype": {"dtype": "junk"},
    "dtype naming a torch function": {"dtype": "load"},
    "dtype a number": {"dtype": 5},
    "model_type a number": {"model_type": 5},
    "junk rope_type": {"rope_parameters": {**ROPE, "rope_type": "junk"}},
    "junk hidden_act": {"hidden_act": "junk"},
    "size null": {"intermediate_size": None, "hidden_act": "silu", "head_dim": None, "num_key_value_heads": None},
    "layers a string": {"num_hidden_layers": "1"},
    "layers a float": {"num_hidden_layers": 1.5},
    "layers a bool": {"num_hidden_layers": True},
    "40000 layers": {"num_hidden_layers": 40000},
    "2**40 layers": {"num_hidden_layers": 2**40},
    "head_dim 2**28": {"head_dim": 2**28},
    "vocab 2**62": {"vocab_size": 2**62},
    "vocab beyond the embedding": {"vocab_size": 2**30},
    "huge position count": {"max_position_embeddings": 2**40},
    "huge id in a list": {"eos_token_id": [1, 2**40]},
}
SURFACES = ("aockpt inspect", "aockpt pack", "aockpt.load_pretrained")

RUNNER = r"""
import contextlib, io, json, re, sys, time
import aockpt
from aockpt.cli import main

def rss(field):
    return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) // 1024

results = []
for folder, surface, out in json.loads(sys.argv[1]):
    open("/proc/self/clear_refs", "w").write("5")  # peak RSS restarts from here
    start, began = rss("VmRSS"), time.monotonic()
    err, kind, message = io.StringIO(), None, None
    try:
        if surface == "aockpt.load_pretrained":
            aockpt.load_pretrained(folder)
        else:
            with contextlib.redirect_stderr(err):
                args = ["inspect", folder] if surface == "aockpt inspect" else ["pack", folder, out]
                main(args, standalone_mode=True)
    except aockpt.AockptError as e:
        kind, message = type(e).__name__, str(e)
    except SystemExit as e:
        kind, message = (f"exit {e.code}" if e.code else None), err.getvalue()
    results.append({"kind": kind, "message": message, "seconds": time.monotonic() - began,
                    "growth_mb": rss("VmHWM") - start})
print(json.dumps(results))
"""


def _packed(tmp: Path) -> Path:
    """A tiny int8 Llama folder written by aockpt.save_pretrained: the good config every case edits."""
    model = tiny_model(layers=1)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear))
    aockpt.save_pretrained(model, tmp / "good")
    return tmp / "good"


def _edited(good: Path, folder: Path, fields: dict) -> Path:
    """A copy of the good folder with some config.json fields set."""
    folder.mkdir()
    for f in good.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((good / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))
    return folder


def _run(jobs: list[tuple[str, str, str]]) -> list[dict]:
    """Each (folder, surface, destination) run in one fresh process, with its own time and peak-RSS growth."""
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "AOCKPT_NO_PROGRESS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_hostile_config_is_one_refusal_line_in_bounded_time_and_memory(tmp_path):
    good = _packed(tmp_path)
    folders = [_edited(good, tmp_path / f"c{i}", fields) for i, fields in enumerate(HOSTILE.values())]
    jobs = [(str(folder), surface, str(tmp_path / f"out{i}-{j}"))
            for i, folder in enumerate(folders) for j, surface in enumerate(SURFACES)]
    warm_up = [(str(good), "aockpt inspect", ""), (str(good), "aockpt.load_pretrained", "")]
    results = _run(warm_up + jobs)  # the good folder first: it still passes, and imports transformers' model code
    assert [r["kind"] for r in results[:2]] == [None, None]
    results = results[2:]
    names = [name for name in HOSTILE for _ in SURFACES]
    for name, (_, surface, out), got in zip(names, jobs, results):
        where = f"{name} through {surface}: {got}"
        if surface == "aockpt.load_pretrained":
            assert got["kind"] == "CorruptCheckpointError", where
        else:
            assert got["kind"] == "exit 4", where  # the README's code for CorruptCheckpointError
            assert got["message"].count("\n") == 1 and got["message"].startswith("Error: "), where
            assert not Path(out).exists(), where
        assert "\n" not in got["message"].strip() and "config.json" in got["message"], where
        assert got["seconds"] < SECONDS and got["growth_mb"] < GROWTH_MB, where


def test_the_build_budget_stops_a_model_the_tensors_cannot_hold():
    """A config whose counts are within the table's fields but whose model registers more modules than the
    stored tensors back is stopped while transformers builds it, not after."""
    config = tiny_config("llama", layers=30).to_dict()
    with pytest.raises(CorruptCheckpointError, match="more than 184 modules"):
        skeleton(config, Backing(30, 128), "config.json")
    assert skeleton(config, Backing(30 * 9 + 3, 128), "config.json") is not None


def test_computed_buffers_beyond_the_weights_are_refused():
    module = torch.nn.Module()
    module.register_buffer("mask", torch.empty(2**20, 2**10, device="meta"), persistent=False)
    with pytest.raises(CorruptCheckpointError, match="bytes of buffers"):
        check_buffers(module, Backing(1, 8, 100), "config.json")
    check_buffers(module, Backing(1, 8, 2**33), "config.json")


def _with_field(record: dict) -> dict:
    """The good config record with a field its class does not have."""
    return {"default": {**record, "_data": {**record["_data"], "no_such_field": 1}}}


@pytest.mark.parametrize("quant_type, why", [
    (lambda good: "int8_weight_only", "one key 'default'"),
    (lambda good: {"default": {"_type": "quantize_", "_data": {}}}, "'quantize_' is not a configuration class"),
    (lambda good: {"default": {"_type": "torch", "_data": {}}}, "'torch' is not a configuration class"),
    (lambda good: {"default": {"_type": "os", "_data": "system"}}, "'os' is not a configuration class"),
    (lambda good: {"default": {"_type": "torch.dtype", "_data": "load"}}, "not a dtype"),
    (lambda good: _with_field(good["default"]), "unexpected keyword"),
    (lambda good: {"default": {"_type": "PerRow", "_data": {}}}, "not a torchao config"),
], ids=["string", "function", "module", "module-outside-torchao", "dtype-function", "unknown-field", "not-a-config"])
def test_the_stock_verdict_refuses_what_stock_refuses(tmp_path, quant_type, why):
    good = _packed(tmp_path)
    config = json.loads((good / "config.json").read_text())
    qc = config["quantization_config"]
    folder = _edited(good, tmp_path / "bad", {"quantization_config": {**qc, "quant_type": quant_type(qc["quant_type"])}})
    verdict = aockpt.inspect(folder).stock
    assert verdict.verdict == "refuses" and why in verdict.reason, verdict
    with pytest.raises((ValueError, TypeError, AssertionError)):
        AutoModelForCausalLM.from_pretrained(folder)
    aockpt.pack(folder, tmp_path / "packed")  # pack writes the quantization_config the tensors imply
    assert aockpt.inspect(tmp_path / "packed").stock.verdict == "loads exactly"
    ids = torch.arange(6).reshape(1, 6)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "packed")(ids).logits,
                           aockpt.load_pretrained(folder)(ids).logits)


@pytest.mark.parametrize("auto_map", [False, True], ids=["unknown model_type", "auto_map"])
def test_a_model_type_stock_does_not_know_is_packed_as_is_and_refused_by_load_pretrained(tmp_path, auto_map):
    good = _packed(tmp_path)
    fields = {"model_type": "no-such-model"}
    if auto_map:
        fields["auto_map"] = {"AutoConfig": "modeling.Config", "AutoModelForCausalLM": "modeling.Model"}
    folder = _edited(good, tmp_path / "bad", fields)
    assert aockpt.inspect(folder).stock.verdict == "refuses"
    with pytest.raises(ValueError):
        AutoModelForCausalLM.from_pretrained(folder)
    aockpt.pack(folder, tmp_path / "packed")
    assert json.loads((tmp_path / "packed" / "config.json").read_text())["model_type"] == "no-such-model"
    with pytest.raises(UnsafeCheckpointError if auto_map else UnsupportedTensorError, match="model_class="):
        aockpt.load_pretrained(folder)


def test_a_pickle_files_neighbouring_config_is_not_read(tmp_path):
    """The user named a file: a config.json beside it (hostile, or a link out of the folder) plays no part."""
    model = tiny_model(layers=1)
    (tmp_path / "dir").mkdir()
    torch.save(model.state_dict(), tmp_path / "dir" / "model.pt")
    (tmp_path / "elsewhere.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 40000}))
    (tmp_path / "dir" / "config.json").symlink_to(tmp_path / "elsewhere.json")
    aockpt.pack(tmp_path / "dir" / "model.pt", tmp_path / "packed")
    assert sorted(p.name for p in (tmp_path / "packed").iterdir()) == ["model.safetensors"]
    assert aockpt.inspect(tmp_path / "dir" / "model.pt").stock is None


def test_a_fused_moe_with_more_experts_than_tensors_loads(tmp_path):
    """transformers 5 holds a layer's experts as one fused tensor: 16 experts in a 14-tensor checkpoint are
    backed (by the router's [experts, hidden] dimension), not refused; both loaders read the same weights."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=16,
                            num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, vocab_size=128)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).eval()
    aockpt.save_pretrained(model, tmp_path / "moe")
    assert len(aockpt.inspect(tmp_path / "moe").tensors) < config.num_experts
    loaded = aockpt.load_pretrained(tmp_path / "moe")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.arange(6).reshape(1, 6)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, AutoModelForCausalLM.from_pretrained(tmp_path / "moe")(ids).logits)
