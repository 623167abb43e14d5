"""Tensor-parallel loading on real GPUs with NCCL: the one load pipeline's pinned path for a rank's slices vs
the same slices read onto the CPU and then moved (what sharded GPU loads did before the pipeline was one).

    python benchmarks/tp_gpu.py generate DIR [--shape llama-8b]       # an 8B-shaped int8 aockpt folder
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        torchrun --nproc-per-node 2 benchmarks/tp_gpu.py run DIR --json out.json
    python benchmarks/tp_gpu.py run DIR --one-gpu 2 --json out.json        # one GPU: the ranks' loads in turn

Per rank and per method (alternated B, A, B, A on a warm page cache; the second of each is reported):
seconds to have every local tensor on the rank's GPU, bytes read through the fetch interface, and peak GPU
memory against the bytes of the rank's slices; then whether both methods gave the same bytes, part by part.
Then one decoder layer's MLP and q->o projections run colwise/rowwise with an NCCL all-reduce and are
compared with rank 0's single-GPU forward of the whole weights. Results: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PLAN = {
    "model.embed_tokens": "vocab", "lm_head": "colwise",
    **{f"model.layers.*.self_attn.{p}": "colwise" for p in ("q_proj", "k_proj", "v_proj")},
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise", "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
}


def _local_bytes(state: dict) -> int:
    from aockpt import codec

    seen, total = set(), 0
    for name, t in state.items():
        if id(t) not in seen:
            seen.add(id(t))
            total += codec.flatten(name, t).nbytes
    return total


def _load(path: Path, rank: int, world: int, method: str, gpu: int) -> tuple[dict, dict]:
    """One timed load of this rank's slices onto its GPU: straight through pinned buffers ("pinned_slices"), or
    onto the CPU and then moved ("cpu_slices_then_to"); the timing and the tensors (as flat parts, on the CPU)."""
    from aockpt import codec, load, sources
    from aockpt.fetch import CountedFile
    from aockpt.reader import open_checkpoint
    from aockpt.tp import TPShard

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    device = torch.device("cuda", gpu)
    start = time.perf_counter()
    files: list[CountedFile] = []
    ckpt = open_checkpoint(path, opener=lambda p: files.append(CountedFile(p)) or files[-1])
    with sources.from_checkpoint(ckpt, "bench") as source:
        for f in files:
            f.read = 0
        placement_of = TPShard(PLAN, rank, world).placement_of(device if method == "pinned_slices" else load.CPU)
        built = load.load_from(source, {n: placement_of(n) for n in source.names}, relayout=False)
        state = built.tensors
        if method != "pinned_slices":
            state = {n: t.to(device) for n, t in state.items()}
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        stored = sum(s.end - s.begin for f in ckpt.shards.values() for s in f.slots.values())
        out = {"seconds": round(seconds, 3), "bytes_read": sum(f.read for f in files), "stored_bytes": stored,
               "slice_bytes": _local_bytes(state), "peak_gpu_bytes": torch.cuda.max_memory_allocated()}
    parts = {n: {k: p.cpu() for k, p in codec.flatten(n, t).parts.items()} for n, t in state.items()}
    del state, built
    return out, parts


def _same_bytes(a: dict, b: dict) -> bool:
    """Every part of every tensor equal byte for byte."""
    return a.keys() == b.keys() and all(
        a[n].keys() == b[n].keys() and all(torch.equal(a[n][k].reshape(-1).view(torch.uint8),
                                                       b[n][k].reshape(-1).view(torch.uint8)) for k in a[n])
        for n in a)


def _forward_check(path: Path, rank: int, world: int) -> dict:
    """Layer 0 split over the ranks (colwise gate/up/q, rowwise down/o + all-reduce) vs one GPU, whole weights."""
    import torch.distributed as dist

    import aockpt
    from aockpt import tp

    names = {k: f"model.layers.0.{k}.weight" for k in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                                                       "self_attn.q_proj", "self_attn.o_proj")}
    local = tp.load_shard(path, f"cuda:{rank}", shard=tp.TPShard(PLAN, rank, world), keys=list(names.values()))
    x = torch.randn(4, 16, 4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(f"cuda:{rank}")

    def run(w, reduce):
        lin = torch.nn.functional.linear
        gate, up, q = (lin(x, w[names[k]]) for k in ("mlp.gate_proj", "mlp.up_proj", "self_attn.q_proj"))
        return gate, q, reduce(lin(torch.nn.functional.silu(gate) * up, w[names["mlp.down_proj"]])), \
            reduce(lin(q, w[names["self_attn.o_proj"]]))

    def all_reduce(t):
        acc = t.float()
        dist.all_reduce(acc)
        return acc.to(t.dtype)

    gate, q, mlp, attn = run(local, all_reduce)
    gathered = [[torch.empty_like(t) for _ in range(world)] for t in (gate, q)]
    dist.all_gather(gathered[0], gate.contiguous())
    dist.all_gather(gathered[1], q.contiguous())
    if rank != 0:
        return {}
    full = aockpt.load_quantized(path, f"cuda:{rank}", keys=list(names.values()))
    s_gate, s_q, s_mlp, s_attn = run(full, lambda t: t)
    out = {}
    for name, got, want in (("colwise_gate", torch.cat(gathered[0], -1), s_gate),
                            ("colwise_q", torch.cat(gathered[1], -1), s_q),
                            ("rowwise_mlp", mlp, s_mlp), ("rowwise_attn_proj", attn, s_attn)):
        out[f"{name}_exact"] = bool(torch.equal(got, want))
        out[f"{name}_max_abs_diff"] = (got.float() - want.float()).abs().max().item()
        out[f"{name}_max_abs"] = want.float().abs().max().item()
    return out


def run(path: Path, json_out: Path | None, forward_only: bool = False) -> None:
    import torch.distributed as dist

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    results: dict = {}
    parts = {}
    for label in ("cpu_slices_then_to", "pinned_slices", "cpu_slices_then_to", "pinned_slices") * (not forward_only):
        dist.barrier()
        results[label], parts[label] = _load(path, rank, world, label, rank)
    if parts:
        results["same_bytes"] = _same_bytes(parts["cpu_slices_then_to"], parts["pinned_slices"])
        del parts
    results["forward"] = _forward_check(path, rank, world)
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    results["forward_without_reduced_precision_reduction"] = _forward_check(path, rank, world)
    everyone = [None] * world
    dist.all_gather_object(everyone, {"rank": rank, "gpu": torch.cuda.get_device_name(rank), **results})
    if rank == 0:
        text = json.dumps(everyone, indent=2)
        print(text)
        if json_out:
            json_out.write_text(text)
    dist.destroy_process_group()


def run_one_gpu(path: Path, json_out: Path | None, world: int) -> None:
    """Every rank's slices loaded in turn onto GPU 0 by both methods (no process group, no forward check), and
    the whole checkpoint by ``load_quantized`` for scale: for a machine with one GPU."""
    import aockpt

    results: dict = {"gpu": torch.cuda.get_device_name(0), "world": world, "ranks": []}
    for rank in range(world):
        row, parts = {"rank": rank}, {}
        for label in ("cpu_slices_then_to", "pinned_slices") * 2:
            row[label], parts[label] = _load(path, rank, world, label, 0)
        row["same_bytes"] = _same_bytes(parts["cpu_slices_then_to"], parts["pinned_slices"])
        results["ranks"].append(row)
        del parts
    for _ in range(2):
        torch.cuda.empty_cache()
        start = time.perf_counter()
        state = aockpt.load_quantized(path, "cuda:0")
        torch.cuda.synchronize()
        results["whole_load_quantized_seconds"] = round(time.perf_counter() - start, 3)
        del state
    text = json.dumps(results, indent=2)
    print(text)
    if json_out:
        json_out.write_text(text)


def generate(path: Path, shape: str, layers: int | None) -> None:
    import dataclasses

    import aockpt
    from bench_pack_load import SHAPES, build_state_dict

    start = time.perf_counter()
    sizes = SHAPES[shape] if layers is None else dataclasses.replace(SHAPES[shape], layers=layers)
    aockpt.save(build_state_dict(sizes), path, force=True)
    print(f"generated {path} ({sum(p.stat().st_size for p in path.iterdir()) / 1e9:.2f} GB) "
          f"in {time.perf_counter() - start:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["generate", "run"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--layers", type=int, help="generate: fewer decoder layers (same tensor shapes)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--forward-only", action="store_true", help="run: skip the timed loads")
    parser.add_argument("--one-gpu", type=int, metavar="WORLD",
                        help="run without torchrun on one GPU: each of WORLD ranks' loads in turn, no forward check")
    args = parser.parse_args()
    os.environ.setdefault("AOCKPT_NO_PROGRESS", "1")
    if args.command == "generate":
        generate(args.dir, args.shape, args.layers)
    elif args.one_gpu:
        run_one_gpu(args.dir, args.json, args.one_gpu)
    else:
        run(args.dir, args.json, args.forward_only)


if __name__ == "__main__":
    main()
