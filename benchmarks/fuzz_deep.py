"""Long fuzzing run: the mutations of tests/test_fuzz.py over fresh seeds for a given time.

Usage: python benchmarks/fuzz_deep.py --seconds 300 [--start-seed N]
Prints every (flavor, mutation, seed) that raised something other than an AockptError; paste each into
``test_fuzz_regressions`` in tests/test_fuzz.py once fixed. Exits 1 if anything was found.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("AOCKPT_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_fuzz  # noqa: E402


def main() -> int:
    """Run mutations until the time is up; report findings and outcome counts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--start-seed", type=int, default=10**6, help="seeds below 2**32 overlap the unit test's")
    args = parser.parse_args()
    templates = test_fuzz.make_templates(Path(tempfile.mkdtemp(prefix="aockpt-fuzz-")))
    combos = [(f, m) for f in sorted(templates) for m in sorted(test_fuzz.MUTATIONS)]
    outcomes: collections.Counter = collections.Counter()
    findings = []
    deadline = time.monotonic() + args.seconds
    seed = args.start_seed
    while time.monotonic() < deadline:
        for flavor, mutation in combos:
            try:
                result = test_fuzz.check_mutant(templates, flavor, mutation, seed)
                outcomes[(flavor, mutation, "/".join(sorted(set(result.values()))))] += 1
            except BaseException as e:  # noqa: BLE001 - a finding, whatever it is
                if isinstance(e, KeyboardInterrupt):
                    raise
                findings.append((flavor, mutation, seed, "".join(traceback.format_exception_only(e)).strip()))
        seed += 1
    for key, count in sorted(outcomes.items()):
        print(f"{count:7d}  {' '.join(key)}")
    print(f"{sum(outcomes.values()) + len(findings)} mutants, seeds {args.start_seed}..{seed - 1}, "
          f"{len(findings)} finding(s)")
    for flavor, mutation, seed_, error in findings:
        print(f"FINDING ({flavor!r}, {mutation!r}, {seed_}): {error[:300]}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
