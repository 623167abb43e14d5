"""Time and peak memory of aockpt pack/save/load against torch.save, torchao's safetensors helpers and transformers.

A synthetic torchao int8 checkpoint (Llama-shaped: every linear but lm_head an ``Int8Tensor`` made from
random int8 codes and scales, everything else bf16) is written once; then each case runs in a fresh
subprocess, so its peak RSS (VmHWM, reset after imports and setup) is its own. Files are in the page
cache (warm) unless ``--cold`` drops caches before each case (needs root).

Run: python benchmarks/bench_pack_load.py [--shape tinyllama|llama-8b] [--layers N] [--workers N]
     [--device cpu|cuda] [--workdir DIR] [--cold] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("AOCKPT_NO_PROGRESS", "1")


@dataclass(frozen=True)
class LlamaShape:
    """The sizes that decide a Llama checkpoint's tensors."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


SHAPES = {
    "tinyllama": LlamaShape(2048, 5632, 16, 32, 4, 32000),  # ~1 GB as int8
    "llama-8b": LlamaShape(4096, 14336, 32, 32, 8, 128256),  # ~9 GB as int8 (embeddings stay bf16)
}


def _config(shape: LlamaShape):
    """The transformers config of a shape, marked as torchao int8 weight-only."""
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import LlamaConfig, TorchAoConfig

    return LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab, tie_word_embeddings=False,
                       quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))


def build_state_dict(shape: LlamaShape, seed: int = 0) -> dict:
    """Random Llama weights in the layout torchao's Int8WeightOnlyConfig produces, without quantizing."""
    import torch
    from torchao.quantization import Int8Tensor
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(_config(shape))
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, meta in model.state_dict().items():
        data = torch.empty(meta.numel() * 2 if meta.dim() == 2 else meta.numel(), dtype=torch.uint8)
        data.random_(generator=gen)
        if meta.dim() == 2 and name.endswith("proj.weight"):
            n, k = meta.shape
            qdata = data[: n * k].view(torch.int8).reshape(n, k).clone()
            scale = torch.rand(n, 1, generator=gen, dtype=torch.float32) / 64
            out[name] = Int8Tensor(qdata, scale, [1, k], torch.bfloat16)
        else:
            out[name] = (torch.rand(meta.shape, generator=gen, dtype=torch.float32) - 0.5).to(torch.bfloat16)
    return out


def prepare(work: Path, shape: LlamaShape) -> int:
    """Write the inputs every case reads: a torch.save pickle, torchao safetensors, a transformers folder."""
    import torch

    import aockpt

    state = build_state_dict(shape)
    torch.save(state, work / "src.pt")
    (work / "torchao").mkdir()
    _write_torchao(state, work / "torchao" / "model.safetensors")
    aockpt.save(state, work / "hf")
    _config(shape).save_pretrained(work / "hf")
    os.sync()
    return (work / "src.pt").stat().st_size


# --- cases: each runs in its own process; setup is not timed, the operation is -------------------------

def _touch(state: dict) -> int:
    """Read every stored byte of every tensor (subclass parts included), so lazy loads pay for their data."""
    import torch

    from aockpt import codec

    total = 0
    for name, tensor in state.items():
        for part in codec.flatten(name, tensor).parts.values():
            total += int(part.reshape(-1).view(torch.uint8).max()) if part.numel() else 0
    return total


def _in_memory(work: Path) -> dict:
    """The checkpoint as an ordinary in-memory state dict (anonymous memory, like a model just quantized)."""
    import torch

    return torch.load(work / "src.pt", weights_only=True)


def _case_cp(work: Path, ctx: dict) -> None:
    subprocess.run(["cp", str(work / "src.pt"), str(work / "out.pt")], check=True)
    subprocess.run(["sync"], check=True)


def _case_pack_pickle(work: Path, ctx: dict) -> None:
    import aockpt

    aockpt.pack(work / "src.pt", work / "out", workers=ctx["workers"], max_shard_size=ctx["max_shard_size"])


def _case_pack_torchao(work: Path, ctx: dict) -> None:
    import aockpt

    aockpt.pack(work / "torchao", work / "out", workers=ctx["workers"], max_shard_size=ctx["max_shard_size"])


def _case_convert_torch(work: Path, ctx: dict) -> None:
    import torch

    torch.save(torch.load(work / "src.pt", weights_only=True, mmap=True), work / "out.pt")
    _fsync(work / "out.pt")


def _case_convert_torchao(work: Path, ctx: dict) -> None:
    import torch

    state = torch.load(work / "src.pt", weights_only=True, mmap=True)
    _write_torchao(state, work / "out.safetensors")


def _write_torchao(state: dict, path: Path) -> None:
    """What transformers 5 does for torchao tensors: flatten_tensor_state_dict, then save_file; then fsync."""
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    tensors, metadata = flatten_tensor_state_dict(state)
    save_file(tensors, str(path), metadata=metadata)
    _fsync(path)


def _case_save_aockpt(work: Path, ctx: dict) -> None:
    import aockpt

    aockpt.save(ctx["state"], work / "out", workers=ctx["workers"], max_shard_size=ctx["max_shard_size"])


def _case_save_torch(work: Path, ctx: dict) -> None:
    import torch

    torch.save(ctx["state"], work / "out.pt")
    _fsync(work / "out.pt")


def _case_save_torchao(work: Path, ctx: dict) -> None:
    _write_torchao(ctx["state"], work / "out.safetensors")


def _case_save_transformers(work: Path, ctx: dict) -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(work / "hf")
    model.save_pretrained(work / "out")


def _case_load_aockpt(work: Path, ctx: dict) -> None:
    import aockpt

    _sync_touch(aockpt.load_quantized(work / "hf", ctx["device"]), ctx)


def _case_load_torch(work: Path, ctx: dict) -> None:
    import torch

    _sync_touch(torch.load(work / "src.pt", weights_only=True, map_location=ctx["device"]), ctx)


def _case_load_torch_mmap(work: Path, ctx: dict) -> None:
    import torch

    state = torch.load(work / "src.pt", weights_only=True, mmap=True)
    _sync_touch({k: v.to(ctx["device"]) for k, v in state.items()}, ctx)


def _case_load_torchao(work: Path, ctx: dict) -> None:
    from safetensors.torch import load_file
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict
    from safetensors import safe_open

    path = str(work / "torchao" / "model.safetensors")
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    state, _ = unflatten_tensor_state_dict(load_file(path, device=ctx["device"]), metadata)
    _sync_touch(state, ctx)


def _case_load_transformers(work: Path, ctx: dict) -> None:
    import torch
    from transformers import LlamaForCausalLM

    where = {} if ctx["device"] == "cpu" else {"device_map": ctx["device"]}
    model = LlamaForCausalLM.from_pretrained(work / "hf", dtype=torch.bfloat16, **where)
    _sync_touch(model.state_dict(), ctx)


def _sync_touch(state: dict, ctx: dict) -> None:
    """Touch every byte, and wait for the device when it is not the CPU."""
    import torch

    _touch(state)
    if ctx["device"].startswith("cuda"):
        torch.cuda.synchronize()


def _fsync(path: Path) -> None:
    """Make a baseline's output durable, as aockpt's is, so times compare like with like."""
    from aockpt.atomic import fsync_path

    fsync_path(path)


@dataclass(frozen=True)
class Case:
    """One measured operation: its group, label, the function, and its untimed setup."""

    group: str
    label: str
    run: Callable[[Path, dict], None]
    setup: Callable[[Path], dict] | None = None
    reference: bool = False


CASES = {
    "cp": Case("convert file", "cp + sync of src.pt (physical floor)", _case_cp),
    "pack-pickle": Case("convert file", "aockpt pack src.pt", _case_pack_pickle),
    "pack-torchao": Case("convert file", "aockpt pack torchao safetensors", _case_pack_torchao),
    "convert-torch": Case("convert file", "(a) torch.load(mmap) + torch.save", _case_convert_torch),
    "convert-torchao": Case("convert file", "(b) torch.load(mmap) + flatten + save_file", _case_convert_torchao,
                            reference=True),
    "save-aockpt": Case("save in-memory", "aockpt.save", _case_save_aockpt, lambda w: {"state": _in_memory(w)}),
    "save-torch": Case("save in-memory", "(a) torch.save", _case_save_torch, lambda w: {"state": _in_memory(w)}),
    "save-torchao": Case("save in-memory", "(b) flatten + save_file", _case_save_torchao,
                         lambda w: {"state": _in_memory(w)}, reference=True),
    "save-transformers": Case("save in-memory", "(c) from_pretrained + save_pretrained", _case_save_transformers),
    "load-aockpt": Case("load + touch", "aockpt.load_quantized", _case_load_aockpt),
    "load-torch": Case("load + touch", "(a) torch.load(weights_only)", _case_load_torch),
    "load-torch-mmap": Case("load + touch", "(a) torch.load(weights_only, mmap)", _case_load_torch_mmap),
    "load-torchao": Case("load + touch", "(b) load_file + unflatten", _case_load_torchao, reference=True),
    "load-transformers": Case("load + touch", "(c) from_pretrained (aockpt folder)", _case_load_transformers),
}


def _status_kb(field: str) -> int:
    """A VmXXX line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_case(name: str, work: Path, ctx: dict) -> dict:
    """In this (fresh) process: set up, reset the RSS high-water mark, time the operation, read the peak."""
    import resource

    import torch  # noqa: F401 - imported before the baseline so its pages are not counted as the case's
    import torchao.quantization  # noqa: F401

    import aockpt.api  # noqa: F401 - aockpt imports its modules lazily; load them before the baseline

    case = CASES[name]
    ctx = dict(ctx, **(case.setup(work) if case.setup else {}))
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kb("VmRSS")
    start = time.perf_counter()
    error = None
    try:
        case.run(work, ctx)
    except Exception as e:  # noqa: BLE001 - a failing baseline is a result to report, not a crash
        error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"
    seconds = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": seconds, "peak_kb": _status_kb("VmHWM"), "base_kb": base, "children_kb": children,
            "error": error}


def _fresh(name: str, work: Path, ctx: dict, cold: bool) -> dict:
    """Run one case in a new interpreter, after removing the previous case's output."""
    for out in work.glob("out*"):
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.sync()
    if cold:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    cmd = [sys.executable, __file__, "--run-case", name, "--workdir", str(work), "--ctx", json.dumps(ctx)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"seconds": float("nan"), "peak_kb": 0, "base_kb": 0, "children_kb": 0,
                "error": (done.stderr.strip().splitlines() or ["crashed"])[-1][:80]}
    return json.loads(lines[-1])


def _table(results: dict[str, dict], size: int) -> str:
    """One markdown table: per group, time and peak RSS with ratios to the group's reference (b)."""
    rows = ["| group | case | time s | x (b) | x cp | peak RSS MB | above start MB | x size | note |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    floor = results.get("cp", {}).get("seconds")
    for name, case in CASES.items():
        if name not in results:
            continue
        r = results[name]
        ref = next((results[n]["seconds"] for n, c in CASES.items()
                    if c.group == case.group and c.reference and n in results), float("nan"))
        peak = max(r["peak_kb"], r["children_kb"]) * 1024
        above = peak - r["base_kb"] * 1024
        cp_ratio = f"{r['seconds'] / floor:.2f}" if case.group == "convert file" and floor else ""
        rows.append(f"| {case.group} | {case.label} | {r['seconds']:.2f} | {r['seconds'] / ref:.2f} | {cp_ratio} | "
                    f"{peak / 1e6:.0f} | {above / 1e6:.0f} | {above / size:.2f} | {r['error'] or ''} |")
    return "\n".join(rows)


def _machine() -> str:
    """A one-line description of where the numbers were taken."""
    import torch

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Linux {platform.release()}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    parser.add_argument("--layers", type=int, help="override the shape's layer count (size)")
    parser.add_argument("--workers", type=int, default=1, help="aockpt pack/save worker processes")
    parser.add_argument("--max-shard-size", default=None, help="aockpt's shard size (default 5GB); baselines write one file")
    parser.add_argument("--device", default="cpu", help="load target: cpu or cuda")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    parser.add_argument("--workdir", type=Path, help="where to write (default: a temporary folder)")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each case (root only)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--run-case", help=argparse.SUPPRESS)
    parser.add_argument("--ctx", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_case:
        print(json.dumps(run_case(args.run_case, args.workdir, json.loads(args.ctx))))
        return
    shape = SHAPES[args.shape]
    if args.layers:
        shape = LlamaShape(**{**shape.__dict__, "layers": args.layers})
    work = args.workdir or Path(tempfile.mkdtemp(prefix="aockpt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        size = prepare(work, shape) if not (work / "src.pt").exists() else (work / "src.pt").stat().st_size
        print(f"inputs ready in {time.perf_counter() - t:.0f} s: {size / 1e9:.2f} GB ({args.shape}, {shape})",
              file=sys.stderr)
        ctx = {"workers": args.workers, "device": args.device, "max_shard_size": args.max_shard_size}
        results = {}
        for name in args.cases.split(","):
            results[name] = _fresh(name, work, ctx, args.cold)
            print(f"{name}: {results[name]}", file=sys.stderr)
        print(f"machine: {_machine()}; checkpoint {size / 1e9:.2f} GB; workers {args.workers}; "
              f"aockpt shards {args.max_shard_size or '5GB'}; "
              f"device {args.device}; {'cold' if args.cold else 'warm'} page cache\n")
        print(_table(results, size))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
