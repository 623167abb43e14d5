"""Loading from object storage to CPU: aockpt vs the Run:ai Model Streamer vs s3fs + safetensors, same S3 server.

One real S3 server (SeaweedFS, tests/s3_server.py) on 127.0.0.1 holds one ~1 GB packed int8 checkpoint in
~200 MB shards. Every timed load runs in a fresh process; imports and client setup happen before the clock
starts, and the clock stops when every tensor is in host memory. Also measured, in this process: the bytes
each operation transfers (inspect, keys=, each rank of a 2-rank tensor-parallel load), counted by the
fault proxy of the tests (tests/fault_proxy.py) in front of the server.

    python benchmarks/bench_remote.py                        # ~1 GB, concurrency 4 8 16 32, 3 runs each
    python benchmarks/bench_remote.py --gb 0.2 --runs 1      # quick
    python benchmarks/bench_remote.py --device cuda          # on a GPU machine: the same loads to cuda
    python benchmarks/bench_remote.py --tools aockpt runai   # without s3fs (where it is not installed)
Needs: pip install -e ".[test]" s3fs runai-model-streamer runai-model-streamer-s3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def _child(tool: str, url: str, concurrency: int, device: str) -> None:
    """One timed load in this fresh process; prints seconds, tensors, bytes and peak RSS as JSON."""
    import torch

    if device != "cpu":
        torch.empty(1, device=device)  # the CUDA context is set up before the clock starts
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS counts from here (what the imports hold stays in)
    start_rss = _rss_mb("VmRSS")

    shards = json.loads(os.environ["BENCH_SHARDS"])
    if tool == "aockpt":
        import obstore  # noqa: F401 - imports outside the clock, as for the other tools (aockpt imports lazily)

        import aockpt
        import aockpt.load  # noqa: F401
        import aockpt.remote_sources  # noqa: F401

        os.environ["AOCKPT_CONCURRENCY"] = str(concurrency)
        start = time.perf_counter()
        state = aockpt.load_quantized(url, device)
    elif tool == "runai":
        from runai_model_streamer import SafetensorsStreamer

        os.environ["RUNAI_STREAMER_CONCURRENCY"] = str(concurrency)
        with SafetensorsStreamer() as streamer:
            start = time.perf_counter()
            streamer.stream_files([f"{url}/{s}" for s in shards], device=device)
            state = dict(streamer.get_tensors())  # views of its buffer (no memory limit set): no copy counted
            if device != "cpu":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
    else:
        import s3fs
        from safetensors.torch import load

        fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        bucket_prefix = url.removeprefix("s3://")
        start = time.perf_counter()
        blobs = fs.cat([f"{bucket_prefix}/{s}" for s in shards])  # the shards concurrently, each one GET
        state = {k: v.to(device) for blob in blobs.values() for k, v in load(blob).items()}
        if device != "cpu":
            torch.cuda.synchronize()
    if tool != "runai":
        seconds = time.perf_counter() - start
    nbytes = sum(_stored_bytes(t) for t in state.values())
    print(json.dumps({"tool": tool, "device": device, "concurrency": concurrency, "seconds": seconds, "tensors": len(state),
                      "bytes": nbytes, "max_rss_mb": _rss_mb("VmHWM"),
                      "peak_rss_above_start_mb": round(_rss_mb("VmHWM") - start_rss, 1),
                      "largest_tensor_mb": round(max(_stored_bytes(t) for t in state.values()) / 2**20, 1),
                      "torch": torch.__version__}))


def _rss_mb(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process (ru_maxrss would carry the parent's peak across exec on Linux)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024


def _stored_bytes(t: object) -> int:
    """Bytes of a tensor's stored parts (a torchao subclass through its flattening)."""
    import torch

    if type(t) is torch.Tensor:
        return t.numel() * t.element_size()
    import aockpt

    return sum(p.numel() * p.element_size() for p in aockpt.codec.flatten("t", t).parts.values())


def _checkpoint(folder: Path, gb: float) -> Path:
    """A packed int8 weight-only checkpoint of ~`gb` GB (4096 x 4096 layers, torchao quantize_)."""
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    import aockpt

    layers = max(1, round(gb * 2**30 / (4096 * 4096)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(4096, 4096, bias=False, dtype=torch.bfloat16) for _ in range(layers)))
    quantize_(model, Int8WeightOnlyConfig())
    return aockpt.save(model.state_dict(), folder / "packed", max_shard_size="200MB")


def _run(tool: str, url: str, concurrency: int, env: dict[str, str], device: str) -> dict:
    """One fresh process."""
    out = subprocess.run([sys.executable, __file__, "--child", tool, "--url", url, "--concurrency", str(concurrency),
                          "--device", device],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{tool} at concurrency {concurrency} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _transfers(s3: object, url: str, env: dict[str, str]) -> dict[str, int]:
    """Bytes sent by the server for inspect, a keys= load of one layer, and each rank of a 2-rank TP load."""
    import aockpt
    from fault_proxy import FaultProxy

    counts = {}
    with FaultProxy(s3.endpoint) as proxy:
        os.environ.update(env, AWS_ENDPOINT_URL=proxy.endpoint)
        for label, run in [("inspect", lambda: aockpt.inspect(url)),
                           ("keys=['0.weight']", lambda: aockpt.load_quantized(url, keys=["0.weight"])),
                           ("tp rank 0 of 2 (colwise)", lambda: aockpt.load_quantized(
                               url, shard=aockpt.TPShard({"*": "colwise"}, 0, 2))),
                           ("tp rank 1 of 2 (colwise)", lambda: aockpt.load_quantized(
                               url, shard=aockpt.TPShard({"*": "colwise"}, 1, 2)))]:
            before = proxy.sent
            run()
            counts[label] = proxy.sent - before
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument("--tools", nargs="+", default=["aockpt", "runai", "s3fs"], choices=["aockpt", "runai", "s3fs"])
    parser.add_argument("--child")
    parser.add_argument("--url")
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.url, args.concurrency[0], args.device)
        return
    from s3_server import S3Server

    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp, S3Server(Path(tmp) / "s3") as s3:
        folder = _checkpoint(Path(tmp), args.gb)
        url = s3.upload_folder(folder, "bench")
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        stored = sum((folder / s).stat().st_size for s in shards)
        env = {**os.environ, **s3.env(), "BENCH_SHARDS": json.dumps(shards), "AOCKPT_NO_PROGRESS": "1",
               "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0", "AWS_EC2_METADATA_DISABLED": "true"}
        rows = []
        for run in range(args.runs):  # interleaved, so drift hits every tool alike
            for concurrency in args.concurrency:
                for tool in [t for t in args.tools if t != "s3fs"]:
                    rows.append(_run(tool, url, concurrency, env, args.device))
            if "s3fs" in args.tools:
                rows.append(_run("s3fs", url, 0, env, args.device))
        summary = {}
        for row in rows:
            summary.setdefault((row["tool"], row["concurrency"]), []).append(row)
        print(f"checkpoint: {stored / 1e9:.3f} GB in {len(shards)} shards to {args.device}; median of {args.runs} "
              "fresh processes")
        print("| tool | concurrency | seconds | GB/s | peak RSS MB (imports included) | peak RSS MB above the start |"
              "\n|---|---:|---:|---:|---:|---:|")
        for (tool, concurrency), group in summary.items():
            seconds = statistics.median(r["seconds"] for r in group)
            rss, above = max(r["max_rss_mb"] for r in group), max(r["peak_rss_above_start_mb"] for r in group)
            print(f"| {tool} | {concurrency or '-'} | {seconds:.2f} | {stored / seconds / 1e9:.2f} | {rss:.0f} | {above:.0f} |")
        print(f"largest tensor: {rows[0]['largest_tensor_mb']} MB")
        transfers = _transfers(s3, url, env)
        print("| operation | bytes transferred | share of the tensor bytes |\n|---|---:|---:|")
        for label, n in transfers.items():
            print(f"| {label} | {n:,} | {n / stored:.4f} |")
        print(json.dumps({"rows": rows, "transfers": transfers, "stored": stored}))


if __name__ == "__main__":
    main()
