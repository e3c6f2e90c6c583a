#!/usr/bin/env python3
"""The random draws of `dare_*` and `della*`, on one core: numpy's Philox4x64 (`Generator.random` into float32,
what the draws were made with before) against the compiled Philox4x32 (`streammerge.kernels.philox.fill`), and
DARE's step for one model in one pass (`kernels.dare.add_dropped`: the task vector, drawn, dropped, rescaled,
weighted and added) against the operations it fuses (torch's subtraction, division, multiplication and addition
around the compiled draws, numpy's comparison and `masks.keep_only`). Prints nanoseconds per element, best of
--repeat, on arrays of --size elements (the default is a tile: what a merge hands the kernels at a time).

    python scripts/bench_draws.py [--size 262144] [--repeat 200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from streammerge.kernels import dare, philox
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
    draws, keep = torch.empty(n), torch.empty(n, dtype=torch.bool)
    model, base, delta, total = torch.randn(n), torch.randn(n), torch.empty(n), torch.zeros(n)
    generator = np.random.Generator(np.random.Philox(0))

    def operations() -> None:
        torch.sub(model, base, out=delta)
        philox.fill(draws.numpy(), 0, stream)
        compare(np.less, draws, 0.5, keep)
        keep_only(delta, keep, draws)
        total.add_(delta.div_(0.5).mul_(0.7))

    rows = [("numpy Philox4x64, float32 draws", lambda: generator.random(dtype=np.float32, out=draws.numpy())),
            ("compiled Philox4x32, float32 draws", lambda: philox.fill(draws.numpy(), 0, stream)),
            ("DARE step, operations", operations),
            ("DARE step, compiled add_dropped", lambda: dare.add_dropped(model.numpy(), base.numpy(), total.numpy(), 0,
                                                                         stream, 0.5, 0.5, True, 0.7))]
    for name, work in rows:
        print(f"{name:40s} {best_ns(work, n, args.repeat):6.2f} ns per element")


if __name__ == "__main__":
    main()
