"""One rank of the real torch.distributed (gloo) run of tests/test_distributed.py, plus the shared tiny Llama block.

Run as ``python tests/tp_worker.py RANK WORLD PORT DIR`` with PYTHONPATH at the repo root: one launch runs
every step on the checkpoints prepared in DIR (``int8``, ``intx``, ``float8``, ``zeros``), paying torch's
start-up once.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

# the Llama block's projections, torch TP's usual plan for them
PLAN = {"mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise",
        "self_attn.q_proj": "colwise", "self_attn.o_proj": "rowwise"}
HIDDEN, INTERMEDIATE, HEADS = 64, 128, 4
NORM = "input_layernorm.weight"  # plain, replicated by the plan; the DCP steps hold it as a sharded DTensor
COPY_CONFIGS = ("int8", "intx", "float8", "dynamic", "nvfp4")  # checkpoints the copied-slice saves try


def tiny_llama_block_state(config) -> dict[str, torch.Tensor]:
    """A transformers Llama decoder layer's MLP and q/o projections, bf16, quantized with `config`, and a norm."""
    from torchao.quantization import quantize_
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS, num_hidden_layers=1, vocab_size=32)
    layer = LlamaDecoderLayer(cfg, 0).to(torch.bfloat16)
    quantize_(layer, config)
    layer.input_layernorm.weight.data.uniform_(0.5, 1.5)
    return {k: v for k, v in layer.state_dict().items() if k.removesuffix(".weight") in PLAN or k == NORM}


def block_input() -> torch.Tensor:
    """The same activations on every rank."""
    return torch.randn(3, 5, HIDDEN, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)


def forward(w: dict[str, torch.Tensor], x: torch.Tensor, reduce=lambda t: t) -> dict[str, torch.Tensor]:
    """The MLP (gate/up colwise, down rowwise) and q->o projections on whatever slices `w` holds.

    `reduce` sums the rowwise partial outputs across ranks (identity on one process).
    """
    lin = torch.nn.functional.linear
    gate, up = lin(x, w["mlp.gate_proj.weight"]), lin(x, w["mlp.up_proj.weight"])
    q = lin(x, w["self_attn.q_proj.weight"])
    return {"gate": gate, "q": q,
            "mlp": reduce(lin(torch.nn.functional.silu(gate) * up, w["mlp.down_proj.weight"])),
            "attn_proj": reduce(lin(q, w["self_attn.o_proj.weight"]))}


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum partial outputs in float32 (gloo has no bf16 sum on every build), rounded once."""
    import torch.distributed as dist

    acc = t.float()
    dist.all_reduce(acc)
    return acc.to(t.dtype)


def read_counted(path: Path, shard, device: str = "cpu") -> tuple[dict[str, torch.Tensor], int, int]:
    """This rank's slices exactly as stored (no device rules), the tensor bytes read, and all stored bytes."""
    from aockpt import load, sources
    from aockpt.fetch import CountedFile
    from aockpt.reader import open_checkpoint

    files: list[CountedFile] = []
    ckpt = open_checkpoint(path, opener=lambda p: files.append(CountedFile(p, unmapped=True)) or files[-1])
    with sources.from_checkpoint(ckpt, "counted") as source:
        for f in files:
            f.read = 0  # headers are not tensor bytes
        placement_of = shard.placement_of(torch.device(device))
        built = load.load_from(source, {n: placement_of(n) for n in source.names}, relayout=None)
        total = sum(s.end - s.begin for shard_file in ckpt.shards.values() for s in shard_file.slots.values())
        return built.tensors, sum(f.read for f in files), total


def _forward_rank(rank: int, world: int, out: Path) -> None:
    """Load this rank's slices from disk, run the block, save outputs and bytes read."""
    from aockpt import tp

    local, read, total = read_counted(out / "int8", tp.TPShard(PLAN, rank, world))
    dynamic = tp.load_shard(out / "dynamic", shard=tp.TPShard(PLAN, rank, world))
    torch.save({"out": forward(local, block_input(), _all_reduce), "bytes_read": read, "total": total,
                "dynamic": forward(dynamic, block_input(), _all_reduce)}, out / f"rank{rank}.pt")


def _copies(local: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """What users do to slices before saving them: clone, move (.to), wrap as parameters."""
    return {"clone": {k: v.clone() for k, v in local.items()},
            "moved": {k: v.to(torch.device("cpu")) for k, v in local.items()},  # torchao builds a new wrapper
            "parameter": {k: torch.nn.Parameter(v, requires_grad=False) for k, v in local.items()}}


def _dcp_copies_rank(rank: int, world: int, out: Path) -> None:
    """Save copied slices through DCP: without their Shards each save must be refused naming the split
    tensors; with them (intx, every kind of copy; the other types, clones) the folder must be the stored one."""
    import torch.distributed.checkpoint as dcp

    from aockpt import dcp as adcp, tp

    results = {}
    for config in COPY_CONFIGS:
        local = tp.load_shard(out / config, shard=tp.TPShard(PLAN, rank, world))
        for kind, copied in _copies(local).items():
            dst = out / f"copies-{config}-{kind}"
            try:
                dcp.save(copied, storage_writer=adcp.AockptStorageWriter(dst), planner=adcp.AockptSavePlanner())
                results[(config, kind, "refused")] = ""
            except BaseException as e:  # noqa: BLE001 - DCP wraps each rank's error (a BaseException); read its text
                results[(config, kind, "refused")] = f"{type(e).__name__}: {e}"
            if config == "intx" or kind == "clone":
                dcp.save(copied, storage_writer=adcp.AockptStorageWriter(dst / "saved"),
                         planner=adcp.AockptSavePlanner(slices=local))
    torch.save(results, out / f"copies{rank}.pt")


def run_ranks(world: int, out: Path, timeout: float = 180) -> None:
    """Start `world` real processes of this script (gloo on 127.0.0.1) and require every one to succeed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(world), str(port), str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)


def _sharded(whole: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's half of a plain tensor as a DTensor sharded on dim 0."""
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh

    return DTensor.from_local(whole.chunk(world)[rank].clone(), init_device_mesh("cpu", (world,)), [Shard(0)])


def _dcp_save_rank(rank: int, world: int, out: Path) -> None:
    """Save this rank's aockpt.tp slices of the intx checkpoint through DCP into one packed folder."""
    import torch.distributed.checkpoint as dcp

    from aockpt import dcp as adcp, tp

    local = tp.load_shard(out / "intx", shard=tp.TPShard(PLAN, rank, world))
    local[NORM] = _sharded(local[NORM], rank, world)
    dcp.save(local, storage_writer=adcp.AockptStorageWriter(out / "saved"), planner=adcp.AockptSavePlanner(local))


def _dcp_load_rank(rank: int, world: int, out: Path) -> None:
    """Load a packed folder through DCP into this rank's slices of a same-shaped (zeroed) model."""
    import torch.distributed.checkpoint as dcp

    from aockpt import dcp as adcp, tp

    template = tp.load_shard(out / "zeros", shard=tp.TPShard(PLAN, rank, world))
    template[NORM] = _sharded(torch.zeros_like(template[NORM]), rank, world)
    dcp.load(template, storage_reader=adcp.AockptStorageReader(out / "int8"), planner=adcp.AockptLoadPlanner(template))
    expected = tp.load_shard(out / "int8", shard=tp.TPShard(PLAN, rank, world))
    template[NORM] = template[NORM].full_tensor()
    torch.save({"loaded": template, "expected": expected}, out / f"loaded{rank}.pt")


def _dtensor_rank(rank: int, world: int, out: Path) -> None:
    """Wrap float8 slices as DTensors (torchao allows it) and run a colwise projection; int8 is refused."""
    from torch.distributed.tensor import DTensor, Replicate, init_device_mesh

    from aockpt import tp
    from aockpt.errors import UnsupportedTensorError

    mesh = init_device_mesh("cpu", (world,))
    wrapped = tp.load_dtensors(out / "float8", mesh, PLAN)
    x = DTensor.from_local(block_input(), mesh, [Replicate()])
    q = torch.nn.functional.linear(x, wrapped["self_attn.q_proj.weight"])
    try:
        tp.load_dtensors(out / "int8", mesh, PLAN)
        refusal = ""
    except UnsupportedTensorError as e:
        refusal = str(e)
    torch.save({"placements": {k: str(v.placements) for k, v in wrapped.items()},
                "shapes": {k: tuple(v.shape) for k, v in wrapped.items()},
                "q": q.full_tensor(), "refusal": refusal}, out / f"dtensor{rank}.pt")


def main(rank: int, world: int, port: int, out: Path) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for step in (_forward_rank, _dcp_save_rank, _dcp_load_rank, _dtensor_rank, _dcp_copies_rank):
            step(rank, world, out)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    r, n, p, o = sys.argv[1:]
    main(int(r), int(n), int(p), Path(o))
