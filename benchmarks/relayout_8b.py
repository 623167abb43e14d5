"""Time re-laying out an 8B Llama's int4 weights from CUDA tile packing to the CPU opaque packing.

Llama-3-8B shapes (32 layers, hidden 4096, intermediate 14336, 8 KV heads of 128, group 128). The
tile-packed inputs are synthesized once per distinct shape with aockpt's pure-torch packer (proven
bit-identical to torch's CUDA packer) and reused for every layer, so memory stays at a few matrices.
Run: python benchmarks/relayout_8b.py [--layers 32] [--packer torch|pure]
"""

from __future__ import annotations

import argparse
import time

import torch

from aockpt.relayout import Int4Canonical, cpu, relayout, tinygemm

HIDDEN, INTER, KV, GROUP = 4096, 14336, 1024, 128
SHAPES = {  # per layer: name -> (N, K)
    "q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER),
}


def _tile_parts(n: int, k: int, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A random tile-packed int4 weight, as Int4TilePackedTo4dTensor would flatten it."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    sz = torch.rand(k // GROUP, n, 2, generator=gen).to(torch.bfloat16)
    canon = Int4Canonical(codes, sz, GROUP, (n, k), torch.bfloat16)
    codes_p, sz_p = tinygemm.padded(canon, torch.device("cpu"))
    return {"qdata": tinygemm.pack_tiles(codes_p, 8), "scale_and_zero": sz_p}, {"block_size": [1, GROUP], "shape": torch.Size((n, k))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    inputs = {name: _tile_parts(n, k, i) for i, (name, (n, k)) in enumerate(SHAPES.items())}
    nbytes = sum(t.numel() * t.element_size() for p, _ in inputs.values() for t in p.values()) * args.layers
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU packer {cpu.cpu_packer()}")
    start = time.perf_counter()
    per_name = dict.fromkeys(SHAPES, 0.0)
    for _ in range(args.layers):
        for name, (parts, attrs) in inputs.items():
            t = time.perf_counter()
            relayout(tinygemm, cpu, parts, attrs, packer="cuda-tinygemm", build_on="cpu")
            per_name[name] += time.perf_counter() - t
    total = time.perf_counter() - start
    print(f"{args.layers} layers, {7 * args.layers} int4 matrices, {nbytes / 2**30:.2f} GiB packed: "
          f"tile -> cpu opaque in {total:.1f} s ({nbytes / 2**20 / total:.0f} MiB/s)")
    for name, secs in per_name.items():
        print(f"  {name:9s} {SHAPES[name]}: {secs / args.layers * 1000:.0f} ms per layer")


if __name__ == "__main__":
    main()
