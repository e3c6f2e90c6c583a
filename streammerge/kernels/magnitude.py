"""A magnitude sparsifier's step for one model with TIES' sign consensus (`ties`, `breadcrumbs_ties`), compiled:
its task vector made, its entries outside the selected magnitude bounds set to +0, weighted and added to the four
sums of `consensus.add_by_sign` in one pass, where the element-wise operations take one each (subtract the base,
take the magnitude, compare with each bound, mask, multiply by the weight, add by sign). The same single
operations in the sums' dtype, so the same bits: `tests/test_kernels.py` holds the kernel to them."""

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
def add_within_by_sign(x, base, positive, negative, weight_positive, weight_negative, low, high, weight, first):
    """((x - base) where low <= |x - base| <= high, else +0) * weight, added by sign as `consensus.add_by_sign`
    adds it (to sums of +0, not read, for the `first` model); `low` and `high` of the values' dtype (an exclusive
    bound becomes the next value inward)."""
    zero, weight = positive.dtype.type(0), positive.dtype.type(weight)
    for j in range(x.size):
        value = _kept(x[j], base[j], low, high, zero) * weight
        sign_add(value, j, positive, negative, weight_positive, weight_negative, weight, zero, first)


def load() -> None:
    """Compile the kernel, or load it from numba's cache, for both accumulation dtypes."""
    for dtype in (np.float32, np.float64):
        bound = np.dtype(dtype).type(1)
        add_within_by_sign(*(np.zeros(1, dtype=dtype) for _ in range(6)), bound, bound, 1.0, True)
