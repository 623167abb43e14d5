"""Checkpoints quantized by other libraries are refused by pack, unpack, push, save_pretrained and loads, with
nothing written, and described by inspect; parametrized over real compressed-tensors folders, the writers'
layouts of GPTQ/AWQ/bitsandbytes/FP8, and every row of aockpt.foreign's table."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import aockpt
from aockpt import ct_table, foreign, hub
from aockpt.cli import EXIT_CODES, main
from aockpt.errors import ForeignCheckpointError
from aockpt.hf_config import truthful_config
from foreign_writers import CT_PRESETS, HAND_WRITTEN, write_compressed_tensors, write_hand
from hub_server import HubServer

WRITERS = {**{f"ct-{p}": (lambda p: lambda d: write_compressed_tensors(p, d))(p) for p in CT_PRESETS},
           **{m: (lambda m: lambda d: write_hand(m, d))(m) for m in HAND_WRITTEN}}
EXIT = EXIT_CODES[aockpt.UnsupportedTensorError][0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Every foreign folder, written once for the module."""
    root = tmp_path_factory.mktemp("foreign")
    return {name: write(root / name) for name, write in WRITERS.items()}


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _method(folder: Path) -> str:
    qc = _config(folder)["quantization_config"]
    return {True: "bitsandbytes_4bit", False: "bitsandbytes_8bit"}[qc["load_in_4bit"]] \
        if qc["quant_method"] == "bitsandbytes" else qc["quant_method"]


def _refused_by_cli(*args: object) -> str:
    """Run the CLI; assert it exits with UnsupportedTensorError's status and one stderr line; return the line."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == EXIT, result.output
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr.strip()


# compressed-tensors presets aockpt imports (aockpt.ct_source; exactness in tests/test_serving.py): pack converts
# them, every other folder is refused. Activation-quantized schemes have no torchao counterpart aockpt builds.
IMPORTED = {f"ct-{p}" for p in ("W4A16", "W4A16_ASYM", "W8A16", "W8A8", "W2A16", "FP8_DYNAMIC", "NVFP4A16",
                                "MXFP4A16")}
REFUSED = [name for name in WRITERS if name not in IMPORTED]


@pytest.mark.parametrize("name", sorted(IMPORTED))
def test_imported_folders_pack_to_what_compressed_tensors_decompresses(folders, name, tmp_path):
    """Never random weights: every weight of the packed folder equals compressed-tensors' own decompression."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from safetensors.torch import load_file

    src = folders[name]
    assert ct_table.imports(_config(src)["quantization_config"])
    aockpt.pack(src, tmp_path / "dst")
    got = aockpt.load_quantized(tmp_path / "dst")
    want = CompressedTensorsDequantizer(src, ignore=["re:.*embed_tokens"], dtype=torch.bfloat16).process(
        load_file(src / "model.safetensors"))
    assert set(got) == set(want) and any(type(t) is not torch.Tensor for t in got.values())
    for n, t in got.items():
        assert torch.equal(t if type(t) is torch.Tensor else t.dequantize(), want[n]), n
    assert aockpt.inspect(tmp_path / "dst").foreign is None


@pytest.mark.parametrize("name", REFUSED)
def test_pack_and_unpack_refuse_with_nothing_written(folders, name, tmp_path):
    src, method = folders[name], _method(folders[name])
    line = _refused_by_cli("pack", src, tmp_path / "dst")
    assert f"{method} folder" in line and "load it with" in line and "nothing was written" in line
    if method == "compressed-tensors":
        assert f"compressed-tensors folder (format {_config(src)['quantization_config']['format']})" in line
        assert "does not convert this format or scheme of compressed-tensors checkpoints" in line
    else:
        assert f"aockpt does not convert {method} checkpoints" in line
    _refused_by_cli("unpack", src, tmp_path / "dst.pt")
    for load in (aockpt.load_quantized, aockpt.load_pretrained):
        with pytest.raises(ForeignCheckpointError, match=method):
            load(src)
    assert not (tmp_path / "dst").exists() and not (tmp_path / "dst.pt").exists()


@pytest.mark.parametrize("name", REFUSED)
def test_inspect_says_what_it_is_and_what_stock_does(folders, name):
    src, method = folders[name], _method(folders[name])
    info = aockpt.inspect(src)
    assert info.foreign.method == method and info.foreign.in_config
    leaves = foreign.methods()[method].leaves
    stored = {t.name for t in info.tensors}
    expected = {n for n in stored if n.rpartition(".")[2] in leaves}
    assert expected and expected <= set(info.foreign.tensors) <= stored
    assert "does not convert it" in info.kind and method in info.kind
    assert info.stock.verdict == f"reads it through {method}" and not info.stock.loads
    assert "plain tensors only" not in info.stock.reason
    if method == "compressed-tensors":
        assert info.foreign.format == _config(src)["quantization_config"]["format"]
        assert "compressed_tensors: installed here" in info.stock.reason
    text = CliRunner().invoke(main, ["inspect", str(src)]).output
    assert f"stock from_pretrained: reads it through {method}" in text and "does not convert it" in text
    data = json.loads(CliRunner().invoke(main, ["inspect", str(src), "--json"]).output)
    assert data["foreign"]["method"] == method


@pytest.mark.parametrize("name", WRITERS)
def test_without_config_the_tensor_names_are_refused(folders, name, tmp_path):
    src = tmp_path / "noconfig"
    shutil.copytree(folders[name], src)
    (src / "config.json").unlink()
    line = _refused_by_cli("pack", src, tmp_path / "dst")
    assert "are named as" in line and "does not convert such checkpoints" in line
    assert _method(folders[name]) in line.split(" are named as ")[1].split(" write them")[0].split(" or ")
    _refused_by_cli("pack", src / "model.safetensors", tmp_path / "dst")  # the weights file alone too
    assert not (tmp_path / "dst").exists()
    info = aockpt.inspect(src)
    assert not info.foreign.in_config and info.foreign.tensors and info.stock is None


@pytest.mark.parametrize("qc", [None, {"quant_method": "torchao", "quant_type": {}}])
def test_foreign_tensor_names_under_no_or_a_torchao_config_are_refused(folders, qc, tmp_path):
    src = tmp_path / "stripped"
    shutil.copytree(folders["ct-W4A16"], src)
    config = {**_config(src), "quantization_config": qc}
    (src / "config.json").write_text(json.dumps(config))
    assert aockpt.inspect(src).stock.verdict == "loads wrong weights"
    assert "named as compressed-tensors" in _refused_by_cli("pack", src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def _row_folder(method: str, row: foreign.Method, dst: Path, *, config: bool = True) -> Path:
    """A folder for one table row: its quant_method in config.json, one tensor per name its writers use."""
    dst.mkdir()
    tensors = {"model.embed_tokens.weight": torch.zeros(4, 4), "model.layers.0.q_proj.weight": torch.zeros(4, 4)}
    tensors.update({f"model.layers.0.q_proj.{leaf}": torch.ones(2) for leaf in sorted(row.leaves)})
    save_file(tensors, str(dst / "model.safetensors"))
    if config:
        qc = {"quant_method": method.removesuffix("_4bit").removesuffix("_8bit")}
        if method.startswith("bitsandbytes_"):
            qc[f"load_in_{method[-4:]}"] = True
        (dst / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    return dst


@pytest.mark.parametrize("method", sorted(foreign.methods()))
def test_every_method_in_the_table_is_refused(method, tmp_path):
    row = foreign.methods()[method]
    src = _row_folder(method, row, tmp_path / "src")
    kind = f"this format or scheme of {method}" if row.converts is not None else method  # a row with an importer
    with pytest.raises(ForeignCheckpointError, match=f"aockpt does not convert {kind} checkpoints"):
        aockpt.pack(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    assert aockpt.inspect(src).foreign.method == method
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    stock = f"reads it through {method}" if method in AUTO_QUANTIZER_MAPPING else "refuses"
    assert aockpt.inspect(src).stock.verdict == stock
    if row.leaves:
        bare = _row_folder(method, row, tmp_path / "bare", config=False)
        with pytest.raises(ForeignCheckpointError, match="are named as"):
            aockpt.pack(bare, tmp_path / "dst")
        assert method in aockpt.inspect(bare).foreign.method.split(" or ")


def test_table_is_transformers_list_less_torchao_and_the_engines_formats():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

    assert set(foreign.methods()) - {"exl2", "modelopt"} == set(AUTO_QUANTIZATION_CONFIG_MAPPING) - {"torchao"}


@pytest.mark.parametrize("qc", [{"quant_method": "exllamav9"}, {"bits": 4}, "gptq"])
def test_a_method_transformers_does_not_know_is_refused(qc, tmp_path):
    src = _row_folder("x", foreign.Method(reader=""), tmp_path / "src", config=False)
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    with pytest.raises(ForeignCheckpointError, match="does not convert"):
        aockpt.pack(src, tmp_path / "dst")
    assert aockpt.inspect(src).stock.verdict == "refuses" and not (tmp_path / "dst").exists()


def test_another_methods_config_is_never_replaced():
    config = {"model_type": "llama", "quantization_config": HAND_WRITTEN["gptq"][0]}
    with pytest.raises(ForeignCheckpointError, match="gptq"):
        truthful_config(config, {}, {})
    legacy = {"model_type": "llama", "quantization_config": {"quant_method": "torchao", "quant_type": {}}}
    assert foreign.detect(legacy, [], torchao=False) is None


def test_torchao_tensors_prove_a_contradicting_config_wrong_unless_foreign_tensors_sit_beside_them(tmp_path):
    """Int8Tensor weights under a gptq config: the tensors are aockpt's own, so pack replaces the config; add one
    tensor named as GPTQ writes it and the folder is refused."""
    from conftest import CASES
    from foreign_writers import tiny_llama

    config = {**tiny_llama().config.to_dict(), "quantization_config": HAND_WRITTEN["gptq"][0],
              "intermediate_size": 128}  # sizes the one stored [64, 128] weight backs (config_rules)
    for name, extra in (("ours", {}), ("mixed", {"model.layers.0.mlp.up_proj.qzeros": torch.zeros(1, 8)})):
        src = aockpt.save({"model.layers.0.mlp.down_proj.weight": CASES["int8-weight-only"][1](), **extra},
                          tmp_path / name)
        (src / "config.json").write_text(json.dumps(config))
        if extra:
            with pytest.raises(ForeignCheckpointError, match="gptq folder"):
                aockpt.pack(src, tmp_path / f"{name}-packed")
            assert not (tmp_path / f"{name}-packed").exists()
            continue
        assert aockpt.inspect(src).stock.verdict == "loads wrong weights"
        aockpt.pack(src, tmp_path / f"{name}-packed")
        written = _config(tmp_path / f"{name}-packed")["quantization_config"]
        assert written["quant_method"] == "torchao" and "Int8WeightOnlyConfig" in json.dumps(written)


def test_push_refuses_before_sending_anything(folders, tmp_path):
    packed = aockpt.save({"model.layers.0.q_proj.weight_packed": torch.zeros(4, 1, dtype=torch.int32),
                          "model.layers.0.q_proj.weight_scale": torch.ones(4, 1)}, tmp_path / "old-packed")
    shutil.copy(folders["ct-W4A16"] / "config.json", packed / "config.json")  # as older aockpt left it
    with HubServer() as server:
        for src in (folders["gptq"], packed):
            with pytest.raises(ForeignCheckpointError, match="does not convert"):
                hub.push(src, "me/m", endpoint=server.endpoint, token=server.token, progress=False)
        assert server.paths() == []


def test_save_pretrained_refuses_a_model_another_library_loaded(folders, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folders["ct-W4A16"])  # stock reads it through compressed-tensors
    assert model.hf_quantizer.quantization_config.quant_method == "compressed-tensors"
    with pytest.raises(ForeignCheckpointError, match="compressed-tensors"):
        aockpt.save_pretrained(model, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_an_importer_row_lets_its_formats_through(folders, monkeypatch, tmp_path):
    """The seam for a converter: a row's `converts` predicate passes the configs it imports, and only those."""
    row = foreign.methods()["compressed-tensors"]
    monkeypatch.setitem(foreign.methods(), "compressed-tensors",
                        dataclasses.replace(row, converts=lambda qc: qc.get("format") == "pack-quantized"))
    assert foreign.detect(_config(folders["ct-W4A16"]), [], torchao=False) is None
    assert foreign.detect(_config(folders["ct-FP8"]), [], torchao=False).format == "float-quantized"
    with pytest.raises(ForeignCheckpointError, match="does not convert this format or scheme of compressed-tensors checkpoints"):
        aockpt.pack(folders["ct-FP8"], tmp_path / "dst")
