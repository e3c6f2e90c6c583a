"""TIES sign consensus, one pass per model and one to elect, instead of the eight and eleven torch and numpy
operations it takes element-wise (`task_vectors.task_vector_merge` documents the arithmetic). Each sum is the same
single float addition in the same order as those operations, so the bits are theirs: `tests/test_kernels.py`
holds the kernels to them, zeros of either sign, NaN and infinities included."""

from __future__ import annotations

import numpy as np
from numba import njit

from streammerge.kernels import compiled


@njit(inline="always", cache=True)
def sign_add(x, j, positive, negative, weight_positive, weight_negative, weight, zero):
    """Element j of `add_by_sign`, for the weighted delta x."""
    positive[j] += zero if x < zero else x
    negative[j] += zero if x > zero else x
    weight_positive[j] += weight if x > zero else zero
    weight_negative[j] += weight if x < zero else zero


@compiled
def add_by_sign(delta, positive, negative, weight_positive, weight_negative, weight):
    """Add one model's weighted delta: its positive part to `positive`, its negative part to `negative` (a NaN
    to both), and `weight` to `weight_positive` where it is above zero, to `weight_negative` where below."""
    zero = delta.dtype.type(0)
    w = delta.dtype.type(weight)  # (rounded to the buffers' dtype, as torch rounds a Python number)
    for j in range(delta.size):
        sign_add(delta[j], j, positive, negative, weight_positive, weight_negative, w, zero)


@compiled
def elect(positive, negative, weight_positive, weight_negative, chosen, weight):
    """The elected sign is + where positive + negative >= 0 (not where that sum is NaN): `chosen` takes that
    sign's sum and `weight` that sign's weight, or 1 where it is zero (nothing to normalise)."""
    zero, one = positive.dtype.type(0), positive.dtype.type(1)
    for j in range(positive.size):
        up = positive[j] + negative[j] >= zero
        chosen[j] = positive[j] if up else negative[j]
        w = weight_positive[j] if up else weight_negative[j]
        weight[j] = one if w == zero else w


def load() -> None:
    """Compile the kernels, or load them from numba's cache, for both accumulation dtypes."""
    for dtype in (np.float32, np.float64):
        a = [np.zeros(1, dtype=dtype) for _ in range(6)]
        add_by_sign(*a[:5], 1.0)
        elect(*a)
