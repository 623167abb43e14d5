"""Hugging Face folders: legacy folders pack into ones stock transformers loads; load_pretrained loads the rest."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from conftest import assert_same_tensor, tiny_config, tiny_model

import aockpt
from aockpt.errors import KeyMismatchError
from aockpt.hf_config import is_legacy_config

LEGACY = Path(__file__).parent.parent / "fixtures" / "legacy" / "ao0.13"
FOLDERS = ["hf_llama_int8wo", "hf_llama_int8dyn", "hf_llama_fqn_mix"]


def _close_to_recorded(logits, recorded, ulps=4):
    """Within a few bf16 ulps of the largest recorded logit (torchao 0.18's activation range is -128..127,
    0.13's was -127..127, and transformers 5's Llama rounds slightly differently from 4.56)."""
    tolerance = ulps * torch.finfo(torch.bfloat16).eps * recorded.abs().max().item()
    assert (logits.float() - recorded.float()).abs().max().item() <= tolerance


@pytest.mark.parametrize("folder", FOLDERS)
def test_legacy_folder_packs_for_stock_transformers(tmp_path, folder):
    src = LEGACY / folder
    assert is_legacy_config(json.loads((src / "config.json").read_text())["quantization_config"])
    aockpt.pack(src, tmp_path / "packed")
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert not is_legacy_config(config["quantization_config"])
    assert sorted(p.name for p in (tmp_path / "packed").iterdir()) == ["config.json", "model.safetensors"]
    expected = load_file(src / "expected.safetensors")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "packed").eval()
    with torch.no_grad():
        stock = model(expected["input_ids"]).logits
    _close_to_recorded(stock, expected["logits"])
    with torch.no_grad():
        ours = aockpt.load_pretrained(src)(expected["input_ids"]).logits
    assert torch.equal(ours, stock)


def test_per_module_mix_keeps_skipped_modules_plain(tmp_path):
    aockpt.pack(LEGACY / "hf_llama_fqn_mix", tmp_path / "packed")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    layers = model.model.layers
    assert type(layers[1].mlp.down_proj.weight) is torch.nn.Parameter
    assert type(layers[0].self_attn.q_proj.weight).__name__ == "Int8Tensor"
    assert layers[0].self_attn.q_proj.weight.act_quant_kwargs is not None
    assert layers[0].mlp.up_proj.weight.act_quant_kwargs is None


def _tiny_int4_cpu_model() -> LlamaForCausalLM:
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor

    model = tiny_model(tie=True)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            module.weight = torch.nn.Parameter(Int4OpaqueTensor.from_hp(module.weight.detach(), [1, 32]),
                                               requires_grad=False)
    return model


def test_load_pretrained_loads_what_stock_cannot(tmp_path):
    model = _tiny_int4_cpu_model()
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        expected = model(ids).logits
    aockpt.save_pretrained(model, tmp_path / "int4")
    assert aockpt.inspect(tmp_path / "int4").not_stock_loadable == ["Int4OpaqueTensor"]
    loaded = aockpt.load_pretrained(tmp_path / "int4")
    assert type(loaded.model.layers[0].mlp.up_proj.weight).__name__ == "Int4OpaqueTensor"
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_load_pretrained_reports_missing_weights(tmp_path):
    model = _tiny_int4_cpu_model()
    state = model.state_dict()
    del state["model.norm.weight"]
    state["extra.weight"] = torch.ones(1)
    aockpt.save(state, tmp_path / "p")
    model.config.save_pretrained(tmp_path / "p")
    with pytest.raises(KeyMismatchError) as caught:
        aockpt.load_pretrained(tmp_path / "p")
    assert "model.norm.weight missing" in str(caught.value) and "extra.weight unexpected" in str(caught.value)


def test_unpack_a_model_folder_into_a_folder(tmp_path):
    aockpt.pack(LEGACY / "hf_llama_int8wo", tmp_path / "packed")
    aockpt.unpack(tmp_path / "packed", tmp_path / "unpacked")
    assert sorted(p.name for p in (tmp_path / "unpacked").iterdir()) == ["config.json", "pytorch_model.bin"]
    state = torch.load(tmp_path / "unpacked" / "pytorch_model.bin", weights_only=True)
    packed = aockpt.load_quantized(tmp_path / "packed")
    assert sorted(state) == sorted(packed)
    assert torch.equal(state["model.layers.0.mlp.up_proj.weight"].qdata, packed["model.layers.0.mlp.up_proj.weight"].qdata)
    aockpt.unpack(tmp_path / "packed", tmp_path / "single.pt")
    assert (tmp_path / "single.pt").is_file()


def test_load_pretrained_takes_an_explicit_model_class(tmp_path):
    from transformers import LlamaModel

    aockpt.pack(LEGACY / "hf_llama_int8wo", tmp_path / "packed")
    state = aockpt.load_quantized(tmp_path / "packed")
    base = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    aockpt.save(base, tmp_path / "base")
    (tmp_path / "base" / "config.json").write_bytes((tmp_path / "packed" / "config.json").read_bytes())
    model = aockpt.load_pretrained(tmp_path / "base", model_class=LlamaModel)
    assert type(model) is LlamaModel and type(model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"


def test_skeleton_holds_no_weights_but_real_buffers():
    from aockpt.pretrained import _parameters_on_meta

    config = tiny_config()
    with _parameters_on_meta():
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert torch.equal(model.model.rotary_emb.inv_freq, LlamaForCausalLM(config).model.rotary_emb.inv_freq)


@pytest.mark.parametrize("make", [
    lambda q: q.Float8DynamicActivationFloat8WeightConfig(granularity=q.PerRow()),  # nests Float8MMConfig v1
    lambda q: q.Float8DynamicActivationFloat8WeightConfig(granularity=q.PerTensor()),
    lambda q: q.Float8WeightOnlyConfig(),
    lambda q: q.Int8DynamicActivationInt8WeightConfig(),
    lambda q: q.Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
], ids=["float8-dyn-row", "float8-dyn-tensor", "float8-wo", "int8-dyn", "int4-tile"])
def test_current_torchao_configs_are_not_called_legacy(make):
    """Found on the H200: a float8 per-row folder that stock loads exactly was predicted "refuses" because a
    helper record nested in it (Float8MMConfig) is at version 1; versions are compared with torchao's classes."""
    import torchao.quantization as q
    from transformers import TorchAoConfig

    assert not is_legacy_config(TorchAoConfig(make(q)).to_dict())
    assert is_legacy_config({"quant_type": {"default": {"_type": "Int8WeightOnlyConfig", "_version": 1, "_data": {}}}})


def test_a_tensor_no_torchao_config_makes_is_refused_by_stock_and_loaded_by_aockpt(tmp_path):
    """An MXTensor without MX activations: torchao 0.18 has no config for it (nor a kernel), so config.json
    tells stock transformers to refuse the folder, and aockpt loads it byte for byte."""
    from torchao.prototype.mx_formats.mx_tensor import MXTensor
    from torchao.quantization.quantize_.common.kernel_preference import KernelPreference

    model = tiny_model(layers=1)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            weight = MXTensor.to_mx(module.weight.detach(), torch.float8_e4m3fn, block_size=32,
                                    kernel_preference=KernelPreference.EMULATED)
            module.weight = torch.nn.Parameter(weight, requires_grad=False)
    aockpt.save_pretrained(model, tmp_path / "mx")
    record = json.loads((tmp_path / "mx" / "config.json").read_text())["quantization_config"]["quant_type"]
    assert record["default"]["_type"] == "LoadWithAockptLoadPretrained"
    assert aockpt.inspect(tmp_path / "mx").stock.verdict == "refuses"
    with pytest.raises(ValueError, match="LoadWithAockptLoadPretrained"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "mx")
    loaded = aockpt.load_pretrained(tmp_path / "mx").state_dict()  # torchao cannot run weight-only MX: compare bytes
    for name, tensor in model.state_dict().items():
        assert_same_tensor(loaded[name], tensor)


@pytest.mark.parametrize("differ", [False, True], ids=["equal copies", "one element differs"])
def test_a_tie_stored_twice_is_stored_once_only_when_the_bytes_agree(tmp_path, differ):
    """torchao 0.14 folders store a tied embedding under both names; pack keeps the tie and one copy."""
    from safetensors.torch import save_file

    model = tiny_model("qwen3", layers=1, tie=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if differ:
        state["lm_head.weight"][0, 0] += 1
    (tmp_path / "src").mkdir()
    save_file(state, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(tmp_path / "src")
    aockpt.pack(tmp_path / "src", tmp_path / "packed")
    stored = {t.name for t in aockpt.inspect(tmp_path / "packed").tensors if t.alias_of is None}
    assert ({"lm_head.weight", "model.embed_tokens.weight"} <= stored) is differ
    assert json.loads((tmp_path / "packed" / "config.json").read_text())["tie_word_embeddings"] is not differ
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is not differ
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name
