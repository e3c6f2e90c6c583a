#!/usr/bin/env python3
"""The random draws of `dare_*` and `della*`, on one core: numpy's Philox4x64 (`Generator.random` into float32,
what the draws were made with before) against the compiled Philox4x32 (`streammerge.kernels.philox.fill`), and
DARE's draw-compare-zero in one pass (`keep_below`) against the draws followed by numpy's comparison and
`masks.keep_only`. Prints nanoseconds per element, best of --repeat, on arrays of --size elements (the default is a
tile: what a merge hands the kernels at a time).

    python scripts/bench_draws.py [--size 262144] [--repeat 200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from streammerge.kernels import philox
from streammerge.methods.masks import compare, keep_only


def best_ns(work, n: int, repeat: int) -> float:
    work()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times) / n * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1 << 18)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n, stream = args.size, np.arange(4, dtype=np.uint32)
    draws, values, keep = torch.empty(n), torch.randn(n), torch.empty(n, dtype=torch.bool)
    generator = np.random.Generator(np.random.Philox(0))

    def numpy_then_mask() -> None:
        generator.random(dtype=np.float32, out=draws.numpy())
        compare(np.less, draws, 0.5, keep)
        keep_only(values, keep, draws)

    rows = [("numpy Philox4x64, float32 draws", lambda: generator.random(dtype=np.float32, out=draws.numpy())),
            ("compiled Philox4x32, float32 draws", lambda: philox.fill(draws.numpy(), 0, stream)),
            ("numpy draws, compare, keep_only", numpy_then_mask),
            ("compiled keep_below", lambda: philox.keep_below(values.numpy(), 0, stream, 0.5))]
    for name, work in rows:
        print(f"{name:40s} {best_ns(work, n, args.repeat):6.2f} ns per element")


if __name__ == "__main__":
    main()
