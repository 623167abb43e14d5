"""Race aockpt's CUDA loads against the floors, safetensors, fastsafetensors and the Run:ai streamer.

Two floors: ``floor`` is the bus (a pinned buffer copied to the GPU until the checkpoint's size has moved);
``pipeline-N`` is issue 15's prototype, N threads ``preadv`` into pinned 16 MB double buffers copied on
side streams, no headers parsed and nothing built (gpu_read_paths.pread_copy).

Builds (once, on the GPU) an 8B-shaped Llama with random bf16 weights, quantizes every linear with
torchao's ``Int8WeightOnlyConfig`` and writes it with ``aockpt.save_pretrained`` (two shards, ~8.5 GB),
a folder stock ``from_pretrained`` reads too. Each loader then runs in a fresh process: imports, CUDA
context and any untimed setup first, then the clock around the load and a final synchronize. Peak
host RSS is VmHWM after resetting it once setup is done. Cold rows drop the page cache first
(``echo 3 > /proc/sys/vm/drop_caches``, needs root); the row records the page cache size before and
after the drop so a drop that did nothing shows. One JSON line per row is appended to --out.

Run (GPU machine): python benchmarks/bench_gpu_load.py --workdir /tmp/b --out results.jsonl [--plan case:2c,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("AOCKPT_NO_PROGRESS", "1")
HERE = Path(__file__).resolve().parent.parent
# case:warm runs, "c" adds a cold run (page cache dropped first)
PLAN = ("aockpt-quantized:2c,floor:1,pipeline-8:2,pipeline-16:2,safetensors:2c,cat:1c,skeleton:2,aockpt-pretrained:2c,"
        "stock-from-pretrained:1c,fastsafetensors-nogds:1c,fastsafetensors-gds:1,runai:1c,device-map-2gpu:2")


def _generate(folder: Path) -> None:
    """The 8B-shaped int8 checkpoint, built and quantized on the GPU, saved by aockpt."""
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from transformers import LlamaConfig, LlamaForCausalLM, TorchAoConfig

    import aockpt

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                         quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, name: isinstance(m, torch.nn.Linear)
              and name != "lm_head")
    aockpt.save_pretrained(model, folder, max_shard_size="5GB")


def _files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("*.safetensors"))


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _gpu_bytes(loaded) -> int:
    """Bytes a load put on GPUs (subclass parts counted through their inner tensors), after the clock."""
    from aockpt.codec import flatten

    if isinstance(loaded, int):
        return loaded
    tensors = loaded.items() if isinstance(loaded, dict) else loaded.state_dict().items()
    seen, total = set(), 0
    for name, t in tensors:
        for part in flatten(name, t).parts.values():
            if part.is_cuda and part.data_ptr() not in seen:
                seen.add(part.data_ptr())
                total += part.numel() * part.element_size()
    return total


def _setup(case: str, folder: Path):
    """Import and prepare what `case` needs (untimed); return the timed callable."""
    import torch
    import torchao.quantization  # noqa: F401  (every row pays its imports before the clock)
    import transformers.models.auto.modeling_auto  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    import transformers.quantizers.auto  # noqa: F401

    import aockpt.api
    import aockpt.codec  # noqa: F401
    import aockpt.pretrained  # noqa: F401

    torch.empty(1, device="cuda")
    files = _files(folder)
    if case.startswith("pipeline-"):  # issue 15's prototype: N threads preadv -> pinned 16 MB buffers -> side stream
        from gpu_read_paths import pread_copy

        return lambda: pread_copy(files, threads=int(case.split("-")[1]), chunk=16 << 20)
    if case == "floor":
        size = sum(os.path.getsize(f) for f in files)
        host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(size, dtype=torch.uint8, device="cuda")

        def floor():
            for at in range(0, size, host.numel()):
                n = min(host.numel(), size - at)
                dev[at:at + n].copy_(host[:n], non_blocking=True)
            return size
        return floor
    if case == "cat":
        return lambda: subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True) and 0
    if case == "safetensors":
        from safetensors.torch import load_file

        def st():
            out = {}
            for f in files:
                out.update(load_file(f, device="cuda:0"))
            return out
        return st
    if case.startswith("fastsafetensors"):
        from fastsafetensors import SafeTensorsFileLoader

        def fst():
            loader = SafeTensorsFileLoader(None, "cuda:0", nogds=case.endswith("nogds"))
            loader.add_filenames({0: files})
            fb = loader.copy_files_to_device()
            out = {k: fb.get_tensor(k) for k in loader.get_keys()}
            torch.cuda.synchronize()
            return out
        return fst
    if case == "runai":
        from runai_model_streamer import SafetensorsStreamer

        def runai():
            out = {}
            with SafetensorsStreamer() as streamer:
                streamer.stream_files(files)
                for name, tensor in streamer.get_tensors():
                    out[name] = tensor.to("cuda:0")
            return out
        return runai
    import aockpt
    import transformers  # noqa: F401  (imported outside the clock for every transformers row)

    if case == "aockpt-quantized":
        return lambda: aockpt.load_quantized(folder, "cuda")
    if case == "skeleton":
        from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

        from aockpt.pretrained import _parameters_on_meta

        def skeleton():
            config = AutoConfig.from_pretrained(folder)
            del config.quantization_config
            with _parameters_on_meta():
                model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
            model.tie_weights()
            return 0
        return skeleton
    if case == "aockpt-pretrained":
        return lambda: aockpt.load_pretrained(folder, "cuda")
    if case == "stock-from-pretrained":
        from transformers import AutoModelForCausalLM

        return lambda: AutoModelForCausalLM.from_pretrained(folder, device_map="cuda")
    if case == "device-map-2gpu":
        return lambda: aockpt.load_pretrained(folder, device_map="auto")
    raise SystemExit(f"unknown case {case}")


def _after(case: str, folder: Path, check: bool) -> dict:
    """Untimed checks: every aockpt part byte-equal to the CPU load; 2-GPU logits equal to one GPU's."""
    import torch

    import aockpt

    if case == "aockpt-quantized" and check:
        gpu = aockpt.load_quantized(folder, "cuda")
        cpu = aockpt.load_quantized(folder, "cpu")
        from aockpt.codec import flatten

        bad = [n for n in cpu for k, p in flatten(n, cpu[n]).parts.items()
               if not torch.equal(flatten(n, gpu[n]).parts[k].reshape(-1).view(torch.uint8).cpu(),
                                  p.reshape(-1).view(torch.uint8))]
        return {"parts_equal_cpu_load": not bad, "unequal": bad[:5]}
    if case == "device-map-2gpu":
        ids = torch.arange(1, 33).reshape(1, 32)
        with torch.no_grad():
            two = aockpt.load_pretrained(folder, device_map="auto")
            placed = sorted({str(p.device) for p in two.parameters()})
            a = two(ids.to("cuda:0")).logits.float().cpu()
            del two
            torch.cuda.empty_cache()
            b = aockpt.load_pretrained(folder, "cuda:0")(ids.to("cuda:0")).logits.float().cpu()
        return {"devices": placed, "logits_equal_single_gpu": bool(torch.equal(a, b)),
                "max_abs_diff": float((a - b).abs().max())}
    return {}


def _child(case: str, folder: Path, check: bool) -> None:
    """One timed load in this process; prints one JSON line."""
    run = _setup(case, folder)
    import torch

    torch.cuda.synchronize()
    Path("/proc/self/clear_refs").write_text("5")
    start_kb = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    loaded = run()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    nbytes = _gpu_bytes(loaded)
    del loaded
    row = {"seconds": round(seconds, 3), "gpu_bytes": nbytes, "rss_start_mb": start_kb // 1024,
           "peak_rss_above_start_mb": (_rss_kb("VmHWM") - start_kb) // 1024}
    try:
        row.update(_after(case, folder, check) if check else {})
    except Exception as e:  # noqa: BLE001 - a failed check is reported, not hidden
        row["check_error"] = f"{type(e).__name__}: {e}"[:300]
    print("RESULT " + json.dumps(row), flush=True)


def _cached_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) // 1024
    return -1


def _drop_caches() -> dict:
    before = _cached_mb()
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3")
    return {"cached_mb_before_drop": before, "cached_mb_after_drop": _cached_mb()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/aockpt-gpu-bench"))
    parser.add_argument("--out", type=Path, default=Path("gpu_load.jsonl"))
    parser.add_argument("--plan", default=PLAN, help="comma-separated case:N[c] (N warm runs, c: one cold run); "
                        "the first run of each case also checks its result")
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.workdir / "llama8b-int8"
    if args.child:
        return _child(args.child, folder, args.check)
    if not folder.is_dir():
        t0 = time.perf_counter()
        _generate(folder)
        _emit(args.out, {"case": "generate", "seconds": round(time.perf_counter() - t0, 1),
                         "bytes": sum(os.path.getsize(f) for f in _files(folder)), "files": len(_files(folder))})
    checked = set()
    for item in args.plan.split(","):  # a case may appear several times: interleaved runs share the drift
        case, _, spec = item.partition(":")
        modes = ["warm"] * int(spec.rstrip("c") or 1) + (["cold"] if spec.endswith("c") else [])
        for i, mode in enumerate(modes):
            if mode == "warm" and i == 0:
                subprocess.run(["cat", *_files(folder)], stdout=subprocess.DEVNULL, check=True)
            extra = _drop_caches() if mode == "cold" else {}
            cmd = [sys.executable, __file__, "--workdir", str(args.workdir), "--child", case]
            cmd += [] if case in checked else ["--check"]
            checked.add(case)
            row = {"case": case, "mode": mode, **extra}
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=HERE)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                row.update(json.loads(lines[-1][7:]) if lines else
                           {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]})
            except subprocess.TimeoutExpired:
                row["error"] = f"timed out after {args.timeout} s"
            _emit(args.out, row)


def _emit(out: Path, row: dict) -> None:
    print(json.dumps(row), flush=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
