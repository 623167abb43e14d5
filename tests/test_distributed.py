"""Real torch.distributed (gloo, 2 processes on CPU): one launch runs a TP forward from per-rank slices,
a DCP save from 2 ranks into one packed folder, and a DCP load resharded 1 -> 2; the tests check its outputs."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig
from torchao.quantization.granularity import PerGroup

import aockpt
from aockpt import codec, dcp as adcp
from conftest import assert_same_tensor
from tp_worker import block_input, forward, run_ranks, tiny_llama_block_state

_CONFIGS = {"int8": Int8WeightOnlyConfig(), "float8": Float8WeightOnlyConfig(),
            "intx": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))}


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """The folder of one 2-rank launch: its inputs (int8, intx, float8, zeros) and what each rank wrote."""
    out = tmp_path_factory.mktemp("gloo")
    for name, config in _CONFIGS.items():
        aockpt.save(tiny_llama_block_state(config), out / name)
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
