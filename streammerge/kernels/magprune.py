"""DELLA's pruning of ranked vectors, compiled: one pass to make each element's sort key and one to keep each
element with its rank's probability and rescale it, around numpy's sort of the keys, instead of the eight torch
and numpy operations (a pass each) that building the keys, scattering the probabilities to their elements,
comparing, masking and dividing take. numpy's sort of 64-bit keys stays: a radix sort compiled here was slower.

A float32 magnitude's key is its IEEE bit pattern with the sign cleared (non-negative floats order like their
patterns; every NaN as one pattern above +Inf), shifted left, then its position in the vector: keys are distinct
and sort as a stable argsort of |delta| orders. `tests/test_kernels.py` holds both to the operations they
replace."""

from __future__ import annotations

import numpy as np

from streammerge.kernels import compiled

MAGNITUDE_BITS = np.int32(0x7FFFFFFF)  # a float32 pattern with its sign cleared
FIRST_NAN = np.int32(0x7F800001)  # |float32| patterns at or above this are NaN: all rank as one value above +Inf


def position_bits(span: int) -> int:
    """Bits that hold a position in a vector of `span` elements, below the magnitude in a key (at least one)."""
    return max(1, (span - 1).bit_length())


@compiled
def rank_keys(bits, keys, shift):
    """keys[u * rest + r, s] = |pattern| << shift | s for the element at [u, s, r] of `bits` (int32 patterns of
    float32 values, [units, span, rest]): one row of keys per vector along dimension 1."""
    units, span, rest = bits.shape
    for u in range(units):
        for r in range(rest):
            row = keys[u * rest + r]
            for s in range(span):
                magnitude = min(bits[u, s, r] & MAGNITUDE_BITS, FIRST_NAN)
                row[s] = (np.int64(magnitude) << shift) | s


@compiled
def prune_ranked(grid, order, positions, draws, by_rank, rescale):
    """DELLA on every vector grid[u, :, r] (grid: [units, span, rest]): the element at position
    order[u * rest + r, k] & positions (rank k) is kept where its draw (float32, in grid's layout) is below
    by_rank[k], +0 elsewhere, then divided by by_rank[k] with `rescale`: the comparison, masking and division
    of the element-wise operations, in grid's dtype."""
    units, span, rest = grid.shape
    zero = grid.dtype.type(0)
    # (an unsigned position, each element loaded before the choice and a loop per `rescale` keep the loops free
    # of branches: about 1 ns an element instead of 8)
    for u in range(units):
        for r in range(rest):
            row = order[u * rest + r]
            if rescale:
                for k in range(span):
                    s, p = np.uint64(row[k] & positions), by_rank[k]
                    value = grid[u, s, r]
                    grid[u, s, r] = (value if draws[u, s, r] < p else zero) / p
            else:
                for k in range(span):
                    s, p = np.uint64(row[k] & positions), by_rank[k]
                    value = grid[u, s, r]
                    grid[u, s, r] = value if draws[u, s, r] < p else zero


def load() -> None:
    """Compile the kernels, or load them from numba's cache, for both accumulation dtypes."""
    order = np.zeros((1, 1), dtype=np.int64)
    rank_keys(np.zeros((1, 1, 1), dtype=np.int32), order, 1)
    for dtype in (np.float32, np.float64):
        prune_ranked(np.zeros((1, 1, 1), dtype=dtype), order, -1, np.zeros((1, 1, 1), dtype=np.float32),
                     np.zeros(1, dtype=dtype), True)
