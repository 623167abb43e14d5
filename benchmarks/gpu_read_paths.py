"""Which host path moves a checkpoint's bytes from the page cache to the GPU fastest, on this machine.

Measures, in one process with the files warm, every way aockpt could feed the GPU: the pinned copy alone
(the bus), N threads ``preadv`` into pinned double buffers with side-stream copies (the loader's design
and issue 15's prototype), the same reads without copies (the page cache alone), and the page cache
mapped, pinned in place with ``cudaHostRegister(..., cudaHostRegisterReadOnly)`` and copied by DMA with
no CPU copy at all. One JSON line per measurement.

Run (GPU machine): python benchmarks/gpu_read_paths.py FILE [FILE ...] --out paths.jsonl
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import threading
import time
from pathlib import Path

import torch

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
READ_ONLY = 8  # cudaHostRegisterReadOnly


def _host(addr: int, n: int) -> torch.Tensor:
    """A CPU uint8 tensor over `n` bytes at `addr` (no copy)."""
    return torch.frombuffer((ctypes.c_char * n).from_address(addr), dtype=torch.uint8)


def _pool(threads: int, jobs: list, work) -> None:
    """Run work(thread_index, job) over `jobs` with `threads` threads pulling from one queue."""
    it, lock, errors = iter(jobs), threading.Lock(), []

    def loop(i: int) -> None:
        state: dict = {}
        try:
            while True:
                with lock:
                    job = next(it, None)
                if job is None:
                    break
                work(i, job, state)
            if "finish" in state:
                state["finish"]()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


def _jobs(files: list[str], chunk: int) -> list[tuple[int, int, int, int]]:
    """(file index, offset, nbytes, destination offset) for every chunk of every file."""
    out = []
    for i, f in enumerate(files):
        size = os.path.getsize(f)
        out += [(i, off, min(chunk, size - off), off) for off in range(0, size, chunk)]
    return out


def pread_copy(files: list[str], threads: int, chunk: int, copy: bool = True, pinned: bool = True) -> int:
    """Threads preadv chunks into two pinned buffers each; each filled buffer is copied on the thread's stream."""
    fds = [os.open(f, os.O_RDONLY) for f in files]
    dev = [torch.empty(os.path.getsize(f), dtype=torch.uint8, device="cuda") for f in files] if copy else None
    staging = torch.empty(threads * 2 * chunk, dtype=torch.uint8, pin_memory=pinned)

    def work(i: int, job, state: dict) -> None:
        if not state:
            state.update(turn=0, events=[None, None], stream=torch.cuda.Stream())
            state["finish"] = lambda: [e.synchronize() for e in state["events"] if e is not None]
        f, off, n, dst = job
        t = state["turn"]
        if state["events"][t] is not None:
            state["events"][t].synchronize()
        buf = staging[(2 * i + t) * chunk:(2 * i + t) * chunk + n]
        view = memoryview((ctypes.c_char * n).from_address(buf.data_ptr())).cast("B")
        got = os.preadv(fds[f], [view], off)
        assert got == n, (got, n)
        if copy:
            with torch.cuda.stream(state["stream"]):
                dev[f][dst:dst + n].copy_(buf, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
            state["events"][t] = ev
        state["turn"] = t ^ 1

    _pool(threads, _jobs(files, chunk), work)
    torch.cuda.synchronize()
    for fd in fds:
        os.close(fd)
    return sum(os.path.getsize(f) for f in files)


def _map(path: str) -> tuple[int, int]:
    """A read-only shared mapping of the whole file: (address, length)."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    os.close(fd)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap failed")
    return addr, size


def register_copy(files: list[str], threads: int, chunk: int, populate: bool = False) -> dict:
    """Page cache pinned in place (cudaHostRegister ReadOnly) chunk by chunk, DMA-copied, unregistered."""
    cudart = torch.cuda.cudart()
    maps = [_map(f) for f in files]
    if populate:
        for addr, size in maps:
            _libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(size), 3)  # MADV_WILLNEED
    dev = [torch.empty(size, dtype=torch.uint8, device="cuda") for _, size in maps]
    times = {"register": 0.0, "unregister": 0.0}
    lock = threading.Lock()

    def work(i: int, job, state: dict) -> None:
        if not state:
            state.update(stream=torch.cuda.Stream(), pending=[])

            def finish():
                for ev, addr in state["pending"]:
                    ev.synchronize()
                    t0 = time.perf_counter()
                    cudart.cudaHostUnregister(addr)
                    with lock:
                        times["unregister"] += time.perf_counter() - t0
            state["finish"] = finish
        f, off, n, dst = job
        base = maps[f][0]
        t0 = time.perf_counter()
        err = cudart.cudaHostRegister(base + off, n, READ_ONLY)
        with lock:
            times["register"] += time.perf_counter() - t0
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister: {err}")
        with torch.cuda.stream(state["stream"]):
            dev[f][dst:dst + n].copy_(_host(base + off, n), non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
        state["pending"].append((ev, base + off))
        if len(state["pending"]) > 2:
            ev0, addr0 = state["pending"].pop(0)
            ev0.synchronize()
            t0 = time.perf_counter()
            cudart.cudaHostUnregister(addr0)
            with lock:
                times["unregister"] += time.perf_counter() - t0

    _pool(threads, _jobs(files, chunk), work)
    torch.cuda.synchronize()
    for addr, size in maps:
        _libc.munmap(ctypes.c_void_p(addr), size)
    return {k: round(v, 3) for k, v in times.items()}


def h2d(files: list[str]) -> int:
    """The bus alone: the files' total size copied from one pinned 1 GB buffer."""
    size = sum(os.path.getsize(f) for f in files)
    host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(size, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for at in range(0, size, host.numel()):
        n = min(host.numel(), size - at)
        dev[at:at + n].copy_(host[:n], non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _equal_to_file(files: list[str]) -> bool:
    """The register path's device bytes equal the pread path's (a sampled check of correctness)."""
    cudart = torch.cuda.cudart()
    f = files[0]
    addr, size = _map(f)
    n = min(size, 64 << 20)
    assert int(cudart.cudaHostRegister(addr, n, READ_ONLY)) == 0
    dev = _host(addr, n).to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    cudart.cudaHostUnregister(addr)
    with open(f, "rb") as fh:
        ref = torch.frombuffer(bytearray(fh.read(n)), dtype=torch.uint8)
    _libc.munmap(ctypes.c_void_p(addr), size)
    return bool(torch.equal(dev.cpu(), ref))


def profile_aockpt(folder: str, out_dir: Path) -> list[dict]:
    """aockpt.load_quantized timed in-process, cProfiled once, and its read pipeline alone over thread/chunk sizes."""
    import cProfile
    import pstats

    import aockpt
    from aockpt import device_load
    from aockpt.sources import open_source

    rows = []
    aockpt.load_quantized(folder, "cuda")
    torch.cuda.empty_cache()
    for r in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        aockpt.load_quantized(folder, "cuda")
        torch.cuda.synchronize()
        rows.append({"case": "aockpt_in_process", "run": r, "seconds": round(time.perf_counter() - t0, 3)})
        torch.cuda.empty_cache()
    prof = cProfile.Profile()
    prof.enable()
    aockpt.load_quantized(folder, "cuda")
    torch.cuda.synchronize()
    prof.disable()
    with (out_dir / "profile.txt").open("w") as f:
        pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(45)
        pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(25)
    torch.cuda.empty_cache()
    with open_source(folder, None) as source:
        ckpt = source.checkpoint
        dev = torch.device("cuda", 0)
        placement = {k: (s, dev) for k, s in ckpt.key_to_shard.items()}
        for threads, chunk in ((8, 16), (12, 8), (12, 16), (16, 8), (16, 16), (12, 4), (24, 4)):
            for r in range(2):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                device_load.load_parts(ckpt.shards, placement, threads=threads, chunk_bytes=chunk << 20)
                torch.cuda.synchronize()
                rows.append({"case": "load_parts", "threads": threads, "chunk": chunk << 20, "run": r,
                             "seconds": round(time.perf_counter() - t0, 3)})
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("files", nargs="+")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--aockpt", help="also profile aockpt.load_quantized of this folder")
    args = p.parse_args()
    files = args.files
    total = sum(os.path.getsize(f) for f in files)
    torch.empty(1, device="cuda")
    rows = [("h2d", {})]
    rows += [("pread_copy", dict(threads=t, chunk=c << 20)) for t, c in
             ((8, 16), (8, 4), (8, 64), (4, 16), (12, 8), (16, 4), (16, 16), (24, 8))]
    rows += [("pread_only", dict(threads=t, chunk=16 << 20, copy=False)) for t in (8, 16)]
    rows += [("pread_only_pageable", dict(threads=8, chunk=16 << 20, copy=False, pinned=False))]
    rows += [("register_copy", dict(threads=t, chunk=c << 20)) for t, c in
             ((1, 256), (4, 64), (4, 256), (8, 64), (8, 16), (16, 64))]
    rows += [("register_copy_willneed", dict(threads=8, chunk=64 << 20, populate=True))]
    fn = {"h2d": h2d, "pread_copy": pread_copy, "pread_only": pread_copy, "pread_only_pageable": pread_copy,
          "register_copy": register_copy, "register_copy_willneed": register_copy}
    with args.out.open("a") as out:
        for row in profile_aockpt(args.aockpt, args.out.parent) if args.aockpt else []:
            print(json.dumps(row), flush=True)
            out.write(json.dumps(row) + "\n")
        try:
            row = {"case": "register_equal", "ok": _equal_to_file(files)}
        except Exception as e:  # noqa: BLE001
            row = {"case": "register_equal", "error": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps(row), flush=True)
        out.write(json.dumps(row) + "\n")
        for name, kw in rows:
            for r in range(args.repeat):
                row = {"case": name, **kw, "run": r}
                try:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    extra = fn[name](files, **kw)
                    torch.cuda.synchronize()
                    secs = time.perf_counter() - t0
                    if name == "h2d":
                        secs, extra = extra, None
                    row.update(seconds=round(secs, 3), gbps=round(total / secs / 1e9, 1))
                    if isinstance(extra, dict):
                        row.update(extra)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
