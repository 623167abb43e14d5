"""Per-tensor overhead of a CPU load (lazy: nothing is touched), this checkout against another one.

Two folders of the 8B Llama's structure with tiny dimensions (57 and 291 int8 tensors), so the time is all
headers, records, plan checks and wrappers. Fresh processes alternate between the checkouts; each loads
the folder 15 times in-process and reports the median; the table gives the median of those medians.

    git worktree add /tmp/before <commit>
    python benchmarks/load_overhead.py --other /tmp/before --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD = """
import statistics, sys, time
import aockpt
times = []
for _ in range(15):
    start = time.perf_counter()
    aockpt.load_quantized(sys.argv[1], "cpu")
    times.append(time.perf_counter() - start)
print(statistics.median(times) * 1e3)
"""


def _folders(root: Path) -> dict[int, Path]:
    """The two tiny 8B-structured folders (32 layers: 291 tensors; 6 layers: 57)."""
    sys.path.insert(0, str(HERE))
    from bench_pack_load import LlamaShape, build_state_dict

    import aockpt

    out = {}
    for layers in (6, 32):
        path = root / f"layers{layers}"
        aockpt.save(build_state_dict(LlamaShape(64, 128, layers, 4, 2, 256)), path)
        out[len(aockpt.inspect(path).tensors)] = path
    return out


def _median_ms(checkout: Path, folder: Path) -> float:
    """One fresh process's median load time, importing aockpt from `checkout`."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "AOCKPT_NO_PROGRESS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder)], env=env, capture_output=True, text=True,
                         check=True, cwd=tempfile.gettempdir())
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, required=True, help="another checkout of aockpt to compare with")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    checkouts = {"this": HERE.parent, "other": args.other.resolve()}
    with tempfile.TemporaryDirectory() as tmp:
        folders = _folders(Path(tmp))
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for count, folder in folders.items():
                for label, checkout in checkouts.items():
                    times.setdefault((label, count), []).append(_median_ms(checkout, folder))
    print(f"| tensors | this checkout ms | {args.other} ms | ratio |\n|---:|---:|---:|---:|")
    for count in folders:
        this, other = (statistics.median(times[(label, count)]) for label in checkouts)
        print(f"| {count} | {this:.2f} | {other:.2f} | {this / other:.2f} |")


if __name__ == "__main__":
    main()
