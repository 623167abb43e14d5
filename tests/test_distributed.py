"""Real torch.distributed (gloo, 2 processes on CPU): one launch runs a TP forward from per-rank slices,
a DCP save from 2 ranks into one packed folder, and a DCP load resharded 1 -> 2; the tests check its outputs."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torchao.quantization import (
    Float8WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
)
from torchao.quantization.granularity import PerGroup

import aockpt
from aockpt import codec, dcp as adcp
from conftest import assert_same_tensor
from aockpt.registry import TENSOR_TYPES
from tp_worker import COPY_CONFIGS, PLAN, block_input, forward, run_ranks, tiny_llama_block_state

_CONFIGS = {"int8": Int8WeightOnlyConfig(), "float8": Float8WeightOnlyConfig(),
            "intx": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
            "dynamic": Int8DynamicActivationInt8WeightConfig()}


def _nvfp4_state() -> dict[str, torch.Tensor]:
    """The block's projections as NVFP4 (torchao's own to_nvfp4; its quantize_ config needs a GPU)."""
    state = tiny_llama_block_state(Float8WeightOnlyConfig())
    plain = tiny_llama_block_state(Int8WeightOnlyConfig())
    return {k: TENSOR_TYPES["NVFP4Tensor"].cls.to_nvfp4(plain[k].dequantize()) if k.removesuffix(".weight") in PLAN
            else state[k] for k in state}


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """The folder of one 2-rank launch: its inputs (int8, intx, float8, zeros) and what each rank wrote."""
    out = tmp_path_factory.mktemp("gloo")
    for name, config in _CONFIGS.items():
        aockpt.save(tiny_llama_block_state(config), out / name)
    aockpt.save(_nvfp4_state(), out / "nvfp4")
    aockpt.save(_zeroed(tiny_llama_block_state(_CONFIGS["int8"])), out / "zeros")
    run_ranks(2, out)
    return out


def _zeroed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors with every stored part zeroed in place."""
    for name, tensor in state.items():
        for part in codec.flatten(name, tensor).parts.values():
            part.zero_()
    return state


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_two_ranks_reproduce_the_single_process_forward(ran):
    single = forward(aockpt.load_quantized(ran / "int8"), block_input())
    ranks = [torch.load(ran / f"rank{r}.pt") for r in range(2)]
    for name in ("gate", "q"):  # colwise: each rank computes its output columns exactly
        assert torch.equal(torch.cat([r["out"][name] for r in ranks], dim=-1), single[name])
    for name in ("mlp", "attn_proj"):  # rowwise + all-reduce: only the summation order differs
        assert torch.equal(ranks[0]["out"][name], ranks[1]["out"][name])
        diff = (ranks[0]["out"][name].float() - single[name].float()).abs().max().item()
        assert diff <= 2 ** -7 * single[name].float().abs().max().item(), (name, diff)  # about one bf16 ulp
    for r in ranks:
        assert r["bytes_read"] <= r["total"] * (1 / 2 + 0.05)


def test_two_ranks_save_one_folder_identical_to_a_single_process_save(ran):
    assert _files(ran / "saved") == _files(ran / "intx")
    assert aockpt.verify(ran / "saved").tensors == 6
    assert not (ran / "saved.aockpt-dcp-staging").exists()


def test_the_two_rank_folder_loads_on_one_process(ran):  # 2 -> 1, no process group at all
    template = _zeroed(tiny_llama_block_state(_CONFIGS["intx"]))
    dcp.load(template, storage_reader=adcp.AockptStorageReader(ran / "saved"), planner=adcp.AockptLoadPlanner())
    for name, tensor in aockpt.load_quantized(ran / "intx").items():
        assert_same_tensor(template[name], tensor)


def test_a_one_process_folder_loads_resharded_on_two_ranks(ran):  # 1 -> 2
    for rank in range(2):
        got = torch.load(ran / f"loaded{rank}.pt", weights_only=False)
        assert set(got["loaded"]) == set(got["expected"]) == {k for k in aockpt.load_quantized(ran / "int8")}
        for name, tensor in got["expected"].items():
            assert_same_tensor(got["loaded"][name], tensor)


def test_float8_slices_wrap_as_dtensors_and_int8_is_refused_by_name(ran):
    full = aockpt.load_quantized(ran / "float8")
    single = forward(full, block_input())
    for rank in range(2):
        got = torch.load(ran / f"dtensor{rank}.pt", weights_only=False)
        assert got["shapes"] == {k: tuple(v.shape) for k, v in full.items()}
        assert got["placements"]["mlp.up_proj.weight"] == "(Shard(dim=0),)"
        assert got["placements"]["mlp.down_proj.weight"] == "(Shard(dim=1),)"
        assert torch.equal(got["q"], single["q"])
        assert re.fullmatch(r"\S+\.weight: torchao's Int8Tensor cannot be wrapped in a DTensor \(torchao does not "
                            r"implement aten\.view for it\); use aockpt\.tp\.load_shard for plain local tensors",
                            got["refusal"]), got["refusal"]


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 step at each |x| (the spacing of bf16 numbers there; 8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(x.float().abs().clamp_min(2.0 ** -126))) - 7)


def test_copied_slices_are_saved_whole_only_when_their_places_come_along(ran):
    """A copy of an aockpt.tp slice saved with no positions is refused naming every split tensor (never half
    a weight); saved with AockptSavePlanner(slices=shards) it is the stored checkpoint, byte for byte."""
    split = sorted(f"{module}.weight" for module in PLAN)
    for rank in range(2):
        results = torch.load(ran / f"copies{rank}.pt", weights_only=False)
        assert {c for c, _, _ in results} == set(COPY_CONFIGS)
        for (config, kind, _), text in results.items():
            assert "UsageError" in text and "different on each rank" in text, (config, kind, text)
            assert all(name in text for name in split), (config, kind, text)
            assert "input_layernorm.weight" not in text  # replicated, equal on both ranks: not named
            assert not (ran / f"copies-{config}-{kind}").joinpath("model.safetensors").exists()
    for config in COPY_CONFIGS:
        for kind in ("clone", "moved", "parameter") if config == "intx" else ("clone",):
            assert _files(ran / f"copies-{config}-{kind}" / "saved") == _files(ran / config), (config, kind)


def _rowwise_ulps(ran, config: str, key: str) -> dict[str, tuple[float, float]]:
    """Rank 0's rowwise outputs against one process: (bf16 ulps of the largest output, most ulps of one element)."""
    single = forward(aockpt.load_quantized(ran / config), block_input())
    got = torch.load(ran / "rank0.pt")[key]
    out = {}
    for name in ("mlp", "attn_proj"):
        want = single[name].float()
        diff = (got[name].float() - want).abs()
        out[name] = ((diff.max() / _bf16_ulp(want.abs().max())).item(), (diff / _bf16_ulp(want)).max().item())
    return out


def test_dynamic_activation_rowwise_differs_by_more_than_summation_order(ran):
    """Int8DynamicActivationInt8WeightConfig: each rank quantizes its half of the activations with its own
    scale, so single rowwise outputs move much further from one process than weight-only ones, whose only
    difference is the summation order (docs/distributed.md quotes these numbers)."""
    single = forward(aockpt.load_quantized(ran / "dynamic"), block_input())
    ranks = [torch.load(ran / f"rank{r}.pt")["dynamic"] for r in range(2)]
    for name in ("gate", "q"):  # colwise: the activation is whole on each rank, so outputs are exact
        assert torch.equal(torch.cat([r[name] for r in ranks], dim=-1), single[name])
    weight_only, dynamic = _rowwise_ulps(ran, "int8", "out"), _rowwise_ulps(ran, "dynamic", "dynamic")
    for name in ("mlp", "attn_proj"):
        print(f"rowwise {name}: weight-only {weight_only[name]}, dynamic {dynamic[name]} "
              "(ulps of the largest output, of single elements)")
        assert weight_only[name][0] <= 1 and dynamic[name][0] <= 2, (name, weight_only, dynamic)
        assert dynamic[name][1] > 4 * weight_only[name][1], (name, weight_only, dynamic)
