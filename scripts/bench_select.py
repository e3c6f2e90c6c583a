#!/usr/bin/env python3
"""The two ways a tensor held whole in one chunk gets its magnitude thresholds (`ties`, `breadcrumbs`, `sce`,
`arcee_fusion`): numpy's partition of all its keys, or sample brackets first and a partition of the few inside
them. Both give the same keys and counts; which is faster depends on whether numpy's partition is vectorised on
this CPU, so a merge times both once (`partition_beats_brackets`). This prints nanoseconds per key for each, on
half-normal float32 magnitudes (best of --repeat), at the median and at two ranks at once (breadcrumbs' 1% and
99%), and the way this machine's merges take.

    python scripts/bench_select.py [--sizes 18,20,22,24] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from streammerge.methods import streaming


def best_seconds(work, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="18,20,22,24", help="log2 of the keys per tensor, comma-separated")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    generator = np.random.default_rng(0)
    print("| keys | ranks | whole partition (ns/key) | brackets (ns/key) |")
    print("|---:|---|---:|---:|")
    for log2 in (int(s) for s in args.sizes.split(",")):
        n = 1 << log2
        bits = np.abs(generator.standard_normal(n, dtype=np.float32)).view(np.int32)
        scratch = np.empty_like(bits)
        for label, ranks in (("median", [n // 2]), ("1% and 99%", [n // 100, n - n // 100])):
            def whole():
                np.copyto(scratch, bits)
                streaming._select_partitioned(scratch, ranks)

            def bracketed():
                if streaming._select_bracketed(bits, scratch, ranks) is None:
                    raise SystemExit("a bracket missed its rank: no timing for the brackets")

            per_key = [best_seconds(work, args.repeat) / n * 1e9 for work in (whole, bracketed)]
            print(f"| 2^{log2} | {label} | {per_key[0]:.2f} | {per_key[1]:.2f} |")
    way = "whole partition" if streaming.partition_beats_brackets() else "brackets"
    print(f"\nmerges on this machine take: {way}")


if __name__ == "__main__":
    main()
