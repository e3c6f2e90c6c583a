"""The pairwise tree sums of `streaming.pairwise_sums`, compiled: the same float64 additions in the same order
(each row of the first half of a block plus the matching row of the second half, then halving), in one call for
many blocks instead of a numpy call per level: for `GroupSums(compiled=True)`, in the methods whose statistics are
such sums or that load compiled kernels anyway. `tests/test_streaming.py` holds it to the numpy sums."""

from __future__ import annotations

import numpy as np

from streammerge.kernels import compiled


@compiled
def block_sums(values, out):
    """out[b, c] = the pairwise tree sum, in float64, of values[b, :, c] (values: [k, m, p], m a power of two,
    C-contiguous; out: [k, p] float64)."""
    k, m, p = values.shape
    half = m // 2
    acc = np.empty(max(half, 1) * p, dtype=np.float64)
    for b in range(k):
        block = values[b].reshape(m * p)  # rows [0, half) then [half, m): row r + half is element r * p + H
        if half == 0:
            for c in range(p):
                out[b, c] = np.float64(block[c])
            continue
        width = half * p
        for i in range(width):
            acc[i] = np.float64(block[i]) + block[i + width]
        rows = half
        while rows > 1:
            rows //= 2
            width = rows * p
            for i in range(width):
                acc[i] += acc[i + width]
        for c in range(p):
            out[b, c] = acc[c]


def load() -> None:
    """Compile the kernel, or load it from numba's cache, for both value dtypes."""
    for dtype in (np.float32, np.float64):
        block_sums(np.zeros((1, 2, 1), dtype=dtype), np.zeros((1, 1), dtype=np.float64))
