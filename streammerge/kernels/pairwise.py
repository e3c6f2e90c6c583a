"""The pairwise tree sums of `streaming.pairwise_sums`, compiled: the same float64 additions in the same order
(each row of the first half of a block plus the matching row of the second half, then halving), in one call for
many blocks instead of a numpy call per level: for `GroupSums(compiled=True)`, in the methods whose statistics are
such sums or that load compiled kernels anyway. `product_block_sums` sums the products of task vectors the same way,
forming them in the tree's first level (`GroupSums.add_vector_products`, for the methods' dot products).
`tests/test_streaming.py` holds both to the numpy sums of the element-wise operations."""

from __future__ import annotations

import numpy as np
from numba import njit

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


@njit(inline="always", cache=True)
def folded(acc, half):
    """The rest of the pairwise tree over acc[:half] (its first level's sums, half a power of two): halves added
    until one value is left, which is returned (acc is overwritten). Inlined into the kernels whose sums must be
    those of `block_sums`' tree (`product_block_sums`, `kernels.sce.squares_block_sums`; numba's cache of a kernel
    in another module does not see a change here: clear `__pycache__` after one)."""
    rows = half
    while rows > 1:
        rows //= 2
        for i in range(rows):
            acc[i] += acc[i + rows]
    return acc[0]


@compiled
def product_block_sums(vectors, base, left, right, grid, out):
    """out[b, q] = the pairwise tree sum of `block_sums`, in float64, of the products d_i * d_j, (i, j) =
    (left[q], right[q]), d_i = vectors[i] - base, or vectors[i] where base is None (in the vectors' dtype, as the
    element-wise operations round the difference and the product), over grid block b: elements [b * grid,
    (b + 1) * grid) of the 1-D arrays, the last block, if shorter, padded with +0 products to a power of two (as
    `GroupSums` pads it). A block's vectors are formed once, into a block-sized scratch, and their products in the
    tree's first level, a pass per pair over data in the CPU's caches, instead of chunk-sized arrays of products;
    without a base, the products are of the vectors' own elements (a copy into the scratch first took 0.6 of the
    kernel's time)."""
    n = vectors[0].size
    blocks = out.shape[0]
    acc = np.empty(max(grid // 2, 1), dtype=np.float64)
    deltas = np.empty((len(vectors) if base is not None else 0, grid), dtype=vectors[0].dtype)
    for b in range(blocks):
        start = b * grid
        length = min(grid, n - start)
        if base is not None:  # (numba compiles one branch or the other, for a None base or an array)
            block_base = base[start:start + length]
            for v in range(len(vectors)):
                values, delta = vectors[v][start:start + length], deltas[v]
                for i in range(length):
                    delta[i] = values[i] - block_base[i]
        m = 1
        while m < length:
            m *= 2
        half = m // 2
        paired = length - half  # elements whose partner in the second half is a value, not padding
        for q in range(left.size):
            if base is None:
                dl, dr = vectors[left[q]][start:start + length], vectors[right[q]][start:start + length]
            else:
                dl, dr = deltas[left[q]], deltas[right[q]]
            if half == 0:
                out[b, q] = np.float64(dl[0] * dr[0])
                continue
            for i in range(paired):
                acc[i] = np.float64(dl[i] * dr[i]) + np.float64(dl[i + half] * dr[i + half])
            for i in range(paired, half):
                acc[i] = np.float64(dl[i] * dr[i]) + 0.0
            out[b, q] = folded(acc, half)


MODEL_COUNTS = (2, 3, 4)  # compiled by `load` (a tuple of arrays compiles per length; others on first use)


def load() -> None:
    """Compile the kernels, or load them from numba's cache, for both value dtypes."""
    pairs = np.zeros(1, dtype=np.int64)
    for dtype in (np.float32, np.float64):
        block_sums(np.zeros((1, 2, 1), dtype=dtype), np.zeros((1, 1), dtype=np.float64))
        for count in MODEL_COUNTS:
            vectors = tuple(np.zeros(1, dtype=dtype) for _ in range(count))
            for base in (np.zeros(1, dtype=dtype), None):
                product_block_sums(vectors, base, pairs, pairs, 2, np.zeros((1, 1), dtype=np.float64))
