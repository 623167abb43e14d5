"""torch.distributed.checkpoint into and out of aockpt folders in one process (aockpt/dcp.py); the 2-rank
runs are in tests/test_distributed.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap

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


_COORDINATOR_PEAK = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    import torch.distributed.checkpoint as dcp
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from aockpt import dcp as adcp

    def mb(field):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) // 1024

    finish = adcp.AockptStorageWriter.finish
    def measured(self, metadata, results):  # the real finish, with the peak it adds recorded
        Path("/proc/self/clear_refs").write_text("5")
        start = mb("VmRSS")
        finish(self, metadata, results)
        print("PEAK", mb("VmHWM") - start)
    adcp.AockptStorageWriter.finish = measured
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False) for _ in range(16)]).to(torch.bfloat16)
    quantize_(model, Int8WeightOnlyConfig())
    dcp.save(model.state_dict(), storage_writer=adcp.AockptStorageWriter(sys.argv[1]), planner=adcp.AockptSavePlanner())
""")


def test_the_coordinator_holds_one_part_at_a_time_not_the_checkpoint(tmp_path):
    """64 MB of 4 MB parts: the coordinator's assembly and write add well under the checkpoint (it was all of it)."""
    run = subprocess.run([sys.executable, "-c", _COORDINATOR_PEAK, str(tmp_path / "saved")], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    peak = int(next(line for line in run.stdout.splitlines() if line.startswith("PEAK")).split()[1])
    assert peak < 16, f"finish added {peak} MB for a 64 MB checkpoint"
    assert aockpt.verify(tmp_path / "saved") is not None
