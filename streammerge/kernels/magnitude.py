"""A magnitude sparsifier's step for one model (TIES, Model Breadcrumbs), compiled: its task vector made, its
entries outside the selected magnitude bounds set to +0, weighted and added to the sums in one pass, where the
element-wise operations take one each (subtract the base, take the magnitude, compare with each bound, mask,
multiply by the weight, add; with TIES' sign consensus, the four sums of `consensus.add_by_sign`). The same
single operations in the sums' dtype, so the same bits: `tests/test_kernels.py` holds the kernels to them."""

from __future__ import annotations

import numpy as np
from numba import njit

from streammerge.kernels import compiled
from streammerge.kernels.consensus import sign_add


@njit(inline="always", cache=True)
def _kept(x, base, low, high, zero):
    delta = x - base
    magnitude = abs(delta)
    return delta if low <= magnitude and magnitude <= high else zero  # (NaN is within no bounds)


@compiled
def add_within(x, base, total, low, high, weight):
    """total += ((x - base) where low <= |x - base| <= high, else +0) * weight; `low` and `high` of the values'
    dtype (an exclusive bound becomes the next value inward)."""
    zero, weight = total.dtype.type(0), total.dtype.type(weight)
    for j in range(x.size):
        total[j] += _kept(x[j], base[j], low, high, zero) * weight


@compiled
def add_within_by_sign(x, base, positive, negative, weight_positive, weight_negative, low, high, weight):
    """`add_within`'s weighted task vector, added by sign as `consensus.add_by_sign` adds it."""
    zero, weight = positive.dtype.type(0), positive.dtype.type(weight)
    for j in range(x.size):
        value = _kept(x[j], base[j], low, high, zero) * weight
        sign_add(value, j, positive, negative, weight_positive, weight_negative, weight, zero)


def load() -> None:
    """Compile the kernels, or load them from numba's cache, for both accumulation dtypes."""
    for dtype in (np.float32, np.float64):
        a = [np.zeros(1, dtype=dtype) for _ in range(6)]
        bound = np.dtype(dtype).type(1)
        add_within(a[0], a[1], a[2], bound, bound, 1.0)
        add_within_by_sign(*a, bound, bound, 1.0)
