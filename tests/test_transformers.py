"""A transformers model packed by aockpt loads with stock from_pretrained and gives the same logits."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaForCausalLM, Qwen3ForCausalLM, TorchAoConfig

from conftest import tiny_config, tiny_model, with_recomputed_buffers

import aockpt
from torchao.quantization import (
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    quantize_,
)
from torchao.quantization.granularity import PerGroup

CONFIGS = {"int8-weight-only": Int8WeightOnlyConfig, "int8-dynamic": Int8DynamicActivationInt8WeightConfig}


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_stock_from_pretrained_gives_same_logits(tmp_path, config_name):
    model = tiny_model(tie=True)
    quant = CONFIGS[config_name]()
    quantize_(model, quant, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn)
    model.config.quantization_config = TorchAoConfig(quant)
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        expected = model(ids).logits
    aockpt.save_pretrained(model, tmp_path / "hf")
    aockpt.pack(tmp_path / "hf", tmp_path / "packed")
    assert (tmp_path / "packed" / "config.json").read_bytes() == (tmp_path / "hf" / "config.json").read_bytes()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "packed", dtype=torch.bfloat16).eval()
    assert type(loaded.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    aockpt.verify(tmp_path / "packed")


def test_stock_save_pretrained_still_fails_on_cpu_torchao_tensors(tmp_path):
    """Why save_pretrained exists: if this starts passing, transformers fixed it and the docs should say so."""
    model = tiny_model(tie=False)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear))
    model.config.quantization_config = TorchAoConfig(Int8WeightOnlyConfig())
    with pytest.raises(RuntimeError, match="invalid python storage"):
        model.save_pretrained(tmp_path / "hf")


def test_sharded_folder_repeats_every_torchao_record_in_every_shard(tmp_path):
    """transformers 5.17 reads one shard's metadata: each shard must describe the whole checkpoint."""
    from safetensors import safe_open
    from torchao.prototype.safetensors.safetensors_utils import is_metadata_torchao

    model = tiny_model(tie=False)
    quant = Int8WeightOnlyConfig()
    quantize_(model, quant, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear))
    model.config.quantization_config = TorchAoConfig(quant)
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        expected = model(ids).logits
    aockpt.save_pretrained(model, tmp_path / "hf", max_shard_size=40_000)
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 2
    quantized = {n for n, p in model.state_dict().items() if type(p).__name__ == "Int8Tensor"}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            metadata = f.metadata()
        assert is_metadata_torchao(metadata) and quantized <= set(metadata)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    assert aockpt.verify(tmp_path / "hf").tensors == len(model.state_dict())


# Parity with transformers' own save_pretrained: the ways users build a model, tied and untied, with and
# without a generation config, each quantized by quantize_ and written by aockpt.save_pretrained.
def _saved_tiny(arch: str, tie: bool, folder):
    """A tiny bf16 model as transformers saves it (the starting point of the from_pretrained ways)."""
    if not folder.exists():
        tiny_model(arch, layers=1, tie=tie).save_pretrained(folder)
    return folder


WAYS = {
    "from_pretrained(dtype=bfloat16)": lambda arch, tie, tmp: AutoModelForCausalLM.from_pretrained(
        _saved_tiny(arch, tie, tmp / "tiny"), dtype=torch.bfloat16),
    "from_pretrained()": lambda arch, tie, tmp: AutoModelForCausalLM.from_pretrained(_saved_tiny(arch, tie, tmp / "tiny")),
    "from_config(cfg)": lambda arch, tie, tmp: AutoModelForCausalLM.from_config(tiny_config(arch, layers=1, tie=tie)),
    "Model(cfg).to(bfloat16)": lambda arch, tie, tmp: MODEL_CLASSES[arch](
        tiny_config(arch, layers=1, tie=tie)).to(torch.bfloat16),
}
MODEL_CLASSES = {"llama": LlamaForCausalLM, "qwen3": Qwen3ForCausalLM}
QUANTS = {
    "int8 weight-only": Int8WeightOnlyConfig,
    "int8 dynamic": Int8DynamicActivationInt8WeightConfig,
    "intx int4": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
}
SHAPES = [("llama", False, False), ("qwen3", True, True), ("llama", True, True), ("qwen3", False, False)]


def _json(path):
    return json.loads(path.read_text())


@pytest.mark.parametrize("quant", sorted(QUANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{a}-{'tied' if t else 'untied'}{'-generation' if g else ''}"
                                               for a, t, g in SHAPES])
@pytest.mark.parametrize("way", list(WAYS))
def test_config_json_is_what_transformers_writes_and_loads_back_exactly(tmp_path, way, shape, quant):
    """aockpt's config.json equals transformers' own save_pretrained output for the unquantized model, field by
    field except quantization_config; generation_config.json too; stock from_pretrained (no dtype given) and
    aockpt.load_pretrained of aockpt's folder give the saved model's logits exactly."""
    arch, tie, generation = shape
    torch.manual_seed(0)
    model = WAYS[way](arch, tie, tmp_path).eval()
    if generation:
        model.generation_config = GenerationConfig(do_sample=True, temperature=0.7, top_k=5, max_new_tokens=7,
                                                   pad_token_id=0)
    copy.deepcopy(model).save_pretrained(tmp_path / "stock")  # transformers' save writes into its config
    quantize_(model, QUANTS[quant](), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head")
    aockpt.save_pretrained(model, tmp_path / "aockpt")
    ours, stock = _json(tmp_path / "aockpt" / "config.json"), _json(tmp_path / "stock" / "config.json")
    assert ours.pop("quantization_config")["quant_method"] == "torchao"
    assert ours == stock
    assert _json(tmp_path / "aockpt" / "generation_config.json") == _json(tmp_path / "stock" / "generation_config.json")
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        expected = with_recomputed_buffers(model)(ids).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "aockpt").eval()(ids).logits, expected)
        assert torch.equal(aockpt.load_pretrained(tmp_path / "aockpt")(ids).logits, expected)


def test_a_cast_model_differs_from_every_reload_by_its_rotary_buffers_only(tmp_path):
    """Why the `.to(dtype)` way is compared after recomputing buffers: transformers' own save -> from_pretrained
    of the unquantized model gives other logits than the cast model, and the same ones once they are recomputed."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config("llama", layers=1)).to(torch.bfloat16).eval()
    copy.deepcopy(model).save_pretrained(tmp_path / "stock")
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval()(ids).logits
        assert not torch.equal(model(ids).logits, reloaded)
        assert torch.equal(with_recomputed_buffers(model)(ids).logits, reloaded)
