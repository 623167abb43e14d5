"""A transformers model packed by aockpt loads with stock from_pretrained and gives the same logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM, TorchAoConfig

from conftest import tiny_model

import aockpt
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

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
