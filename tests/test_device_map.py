"""device_map placement: accelerate's conventions, whole layers, ties kept together, inputs following layers."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import tiny_config

import aockpt
from aockpt import device_map as dm
from aockpt.errors import UsageError

CPU, GPU0, GPU1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)
LEGACY = Path(__file__).parent.parent / "fixtures" / "legacy" / "ao0.13" / "hf_llama_int8wo"
UNITS = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb", "lm_head"]


def _skeleton(tie: bool) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_config(tie=tie))
    model.tie_weights()
    return model


def _sizes(model) -> dict[str, int]:
    return {n: t.numel() * t.element_size() for n, t in model.state_dict().items()}


def test_units_keep_decoder_layers_whole():
    assert dm.units(_skeleton(False)) == UNITS


def test_balanced_splits_layers_evenly_and_ties_follow_their_source():
    model = _skeleton(True)
    mapping = dm._spread(model, _sizes(model), {"lm_head.weight": "model.embed_tokens.weight"}, [10**9] * 2,
                         sequential=False)
    assert mapping == {"model.embed_tokens": GPU0, "model.layers.0": GPU0, "model.layers.1": GPU1,
                       "model.norm": GPU1, "model.rotary_emb": GPU1, "lm_head": GPU0}


def test_sequential_fills_each_gpu_then_the_cpu():
    model = _skeleton(False)
    sizes = _sizes(model)
    layer = sum(v for k, v in sizes.items() if k.startswith("model.layers.0."))
    embed = sizes["model.embed_tokens.weight"]
    mapping = dm._spread(model, sizes, {}, [embed + layer, layer], sequential=True)
    assert mapping == {"model.embed_tokens": GPU0, "model.layers.0": GPU0, "model.layers.1": GPU1,
                       "model.norm": CPU, "model.rotary_emb": CPU, "lm_head": CPU}


def test_map_values_follow_accelerate_and_the_longest_prefix_wins():
    mapping = dm.resolve({"": "cpu", "model.layers": 1, "model.layers.0": "cuda:0"}, _skeleton(False), {}, {})
    assert dm.device_of("model.layers.0.mlp.up_proj.weight", mapping) == GPU0
    assert dm.device_of("model.layers.1.mlp.up_proj.weight", mapping) == GPU1
    assert dm.device_of("lm_head.weight", mapping) == CPU
    with pytest.raises(UsageError, match="disk"):
        dm.resolve({"": "disk"}, _skeleton(False), {}, {})
    with pytest.raises(UsageError, match="lm_head.weight"):
        dm.device_of("lm_head.weight", {"model": CPU})


def test_load_pretrained_with_a_device_map_gives_the_same_logits():
    ids = torch.arange(12).reshape(2, 6)
    mapping = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "": torch.device("cpu")}
    with torch.no_grad():
        expected = aockpt.load_pretrained(LEGACY)(ids).logits
        mapped = aockpt.load_pretrained(LEGACY, device_map=mapping)
        assert mapped.model.layers[0]._forward_pre_hooks
        assert torch.equal(mapped(ids).logits, expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_auto_over_two_gpus_gives_the_single_gpu_logits(tmp_path):
    ids = torch.arange(12).reshape(2, 6)
    aockpt.pack(LEGACY, tmp_path / "packed")
    with torch.no_grad():
        single = aockpt.load_pretrained(tmp_path / "packed", "cuda:0")(ids.cuda()).logits
        model = aockpt.load_pretrained(tmp_path / "packed", device_map="auto")
        devices = {p.device for p in model.parameters()}
        assert devices == {GPU0, GPU1}
        assert torch.equal(model(ids.cuda()).logits.to(GPU0), single)
