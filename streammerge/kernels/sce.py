"""sce's per-entry math, compiled: the variance of the task vectors across the models, the sums of each model's
selected task vector squared, and the merge (sign election, weighted agreeing deltas, their weights' sum,
division, base) in one pass each, where the element-wise torch and numpy operations take ten to twenty
(`methods/sce.py` documents the arithmetic). Each value goes through the same single float operations in the
same order as those operations, so the bits are theirs: `tests/test_kernels.py` holds the kernels to them,
zeros of either sign, NaN and infinities included.

The models' inputs come as a tuple of arrays: a kernel is compiled for each number of models (once per machine;
`load` compiles those of one to four)."""

from __future__ import annotations

import numpy as np
from numba import njit

from streammerge.kernels import compiled
from streammerge.kernels.pairwise import folded

MIN_DIVISOR = 1e-6  # the smallest divisor of the merge (mergekit's clamp)
BLOCK = 1 << 10  # elements the merge takes through every model at a time


@njit(inline="always", cache=True)
def _delta(x, base, kept, zero):
    """A model's task vector at an element, +0 where it is not selected (scalars: an inlined helper taking arrays
    would count references to them at every element)."""
    return x - base if kept else zero


@compiled
def variance(inputs, base, out):
    """out = |population variance across the models of delta_i = inputs[i] - base|, each delta made in the
    inputs' dtype and widened, the mean and the squares summed in float64 from the first term, divided by the
    count, then rounded to the output's dtype (the absolute value clears the sign of the NaN an infinite delta
    makes)."""
    count = len(inputs)
    for j in range(out.size):
        b = base[j]
        mean = np.float64(inputs[0][j] - b)
        for i in range(1, count):
            mean += np.float64(inputs[i][j] - b)
        mean = mean / count
        first = np.float64(inputs[0][j] - b) - mean
        squares = first * first
        for i in range(1, count):
            d = np.float64(inputs[i][j] - b) - mean
            squares += d * d
        out[j] = abs(out.dtype.type(squares / count))


@compiled
def squares_block_sums(inputs, base, keep, selects, grid, out):
    """out[b, i] = the float64 sum of delta_i * delta_i over grid block b (elements [b * grid, (b + 1) * grid) of the
    1-D arrays), delta_i = inputs[i] - base where `keep` holds (everywhere without `selects`), +0 elsewhere, each
    square in the inputs' dtype: the pairwise tree of `kernels.pairwise` (a short last block padded with +0 to a
    power of two, as `GroupSums` pads it), the squares made in its first level. One pass over the block in the
    CPU's caches instead of a chunk-sized array of squares written, then read again to be summed."""
    n = base.size
    acc = np.empty(max(grid // 2, 1), dtype=np.float64)
    zero = base.dtype.type(0)
    for b in range(out.shape[0]):
        start = b * grid
        length = min(grid, n - start)
        m = 1
        while m < length:
            m *= 2
        half = m // 2
        paired = length - half  # elements whose partner in the second half is a value, not padding
        bases = base[start:start + length]
        kept = keep[start:start + length] if selects else keep
        for i in range(len(inputs)):
            x = inputs[i][start:start + length]
            if half == 0:
                d = _delta(x[0], bases[0], kept[0] if selects else True, zero)
                out[b, i] = np.float64(d * d)
                continue
            for k in range(paired):
                d = _delta(x[k], bases[k], kept[k] if selects else True, zero)
                e = _delta(x[k + half], bases[k + half], kept[k + half] if selects else True, zero)
                acc[k] = np.float64(d * d) + np.float64(e * e)
            for k in range(paired, half):
                d = _delta(x[k], bases[k], kept[k] if selects else True, zero)
                acc[k] = np.float64(d * d) + 0.0
            out[b, i] = folded(acc, half)


@compiled
def merge(inputs, base, keep, selects, weights, divisor_weights, out):
    """out = base + sum_i w_i delta_i [agrees] / max(sum_i v_i [agrees], MIN_DIVISOR), delta_i = inputs[i] - base
    where `keep` holds (everywhere without `selects`), +0 elsewhere; a delta agrees where it is > 0 and the sum
    of the deltas is >= 0, or it is < 0 and that sum is not (NaN included). `weights` (w_i) and `divisor_weights`
    (v_i) in out's dtype; each term is (delta * flag) * w_i with flag 1 or 0, as the operations multiply. A block
    of elements at a time, one model after the other (`out` holds the weighted sum until the division): each loop
    then reads plain arrays and vectorises, where a loop over the models inside would index the tuple at run
    time."""
    zero, one = out.dtype.type(0), out.dtype.type(1)
    smallest = out.dtype.type(MIN_DIVISOR)
    total, divisor = np.empty(BLOCK, dtype=out.dtype), np.empty(BLOCK, dtype=out.dtype)
    for a in range(0, out.size, BLOCK):
        z = min(a + BLOCK, out.size)
        m, bases, kept, mixed = z - a, base[a:z], keep[a:z] if selects else keep, out[a:z]
        for k in range(m):
            total[k], divisor[k], mixed[k] = zero, zero, zero
        for i in range(len(inputs)):
            x = inputs[i][a:z]
            for k in range(m):
                total[k] += _delta(x[k], bases[k], kept[k] if selects else True, zero)
        for i in range(len(inputs)):
            x, w, v = inputs[i][a:z], weights[i], divisor_weights[i]
            for k in range(m):
                d = _delta(x[k], bases[k], kept[k] if selects else True, zero)
                flag = one if (d > zero if total[k] >= zero else d < zero) else zero
                mixed[k] += d * flag * w
                divisor[k] += flag * v
        for k in range(m):
            value = divisor[k]
            mixed[k] = mixed[k] / (smallest if value < smallest else value) + bases[k]


def load() -> None:
    """Compile the kernels, or load them from numba's cache, for both accumulation dtypes and one to four
    models."""
    keep = np.zeros(1, dtype=np.bool_)
    for dtype in (np.float32, np.float64):
        one = np.zeros(1, dtype=dtype)
        for count in range(1, 5):
            inputs = tuple(np.zeros(1, dtype=dtype) for _ in range(count))
            variance(inputs, one, one)
            squares_block_sums(inputs, one, keep, True, 2, np.zeros((1, count), dtype=np.float64))
            merge(inputs, one, keep, True, np.zeros(count, dtype=dtype), np.zeros(count, dtype=dtype), one)
