"""torch.distributed.checkpoint into and out of aockpt folders in one process (aockpt/dcp.py); the 2-rank
runs are in tests/test_distributed.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
from torchao.quantization.granularity import PerGroup

import aockpt
from aockpt import dcp as adcp
from aockpt.errors import CorruptCheckpointError
from conftest import CASES, assert_same_tensor
from tp_worker import tiny_llama_block_state


def test_one_process_save_equals_aockpt_save_with_ties_and_plain_tensors(tmp_path):
    w = CASES["float8-weight-only"][1]()
    state = {"embed.weight": w, "lm_head.weight": w, "norm.weight": torch.ones(64, dtype=torch.bfloat16),
             "m.weight": CASES["mxfp4"][1]()}
    aockpt.save(state, tmp_path / "single")
    dcp.save(state, storage_writer=adcp.AockptStorageWriter(tmp_path / "dcp"), planner=adcp.AockptSavePlanner())
    assert {p.name: p.read_bytes() for p in (tmp_path / "dcp").iterdir()} == \
        {p.name: p.read_bytes() for p in (tmp_path / "single").iterdir()}


def test_a_template_of_another_layout_is_refused_by_name(tmp_path):
    aockpt.save(tiny_llama_block_state(Int8WeightOnlyConfig()), tmp_path / "p")
    template = tiny_llama_block_state(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    with pytest.raises(CheckpointException) as caught:
        dcp.load(template, storage_reader=adcp.AockptStorageReader(tmp_path / "p"), planner=adcp.AockptLoadPlanner())
    error = caught.value.failures[0][0]
    assert isinstance(error, CorruptCheckpointError)
    assert str(error).startswith("mlp.down_proj.weight: part mlp.down_proj._weight_scale is stored as torch.float32")


def test_a_torchao_written_file_loads_too(tmp_path):
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    from safetensors.torch import save_file

    state = {"m.weight": CASES["int8-weight-only"][1]()}
    tensors, metadata = flatten_tensor_state_dict(state)
    save_file(tensors, tmp_path / "model.safetensors", metadata=metadata)
    template = {"m.weight": CASES["int8-weight-only"][1]()}
    template["m.weight"].qdata.zero_()
    dcp.load(template, storage_reader=adcp.AockptStorageReader(tmp_path), planner=adcp.AockptLoadPlanner())
    assert_same_tensor(template["m.weight"], state["m.weight"])
