"""A transformers model packed by aockpt loads with stock from_pretrained and gives the same logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TorchAoConfig

import aockpt
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

CONFIGS = {"int8-weight-only": Int8WeightOnlyConfig, "int8-dynamic": Int8DynamicActivationInt8WeightConfig}


def tiny_llama(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=tie)
    return LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_stock_from_pretrained_gives_same_logits(tmp_path, config_name):
    model = tiny_llama(tie=True)
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
    model = tiny_llama(tie=False)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear))
    model.config.quantization_config = TorchAoConfig(Int8WeightOnlyConfig())
    with pytest.raises(RuntimeError, match="invalid python storage"):
        model.save_pretrained(tmp_path / "hf")
