"""DARE's step for one model, compiled: its task vector made, dropped by the Philox draws, rescaled, weighted and
added to the sums in one pass, where the element-wise operations take one each (subtract the base, draw, compare
and zero, divide by the density, multiply by the weight, add; with TIES' sign consensus, the four sums of
`consensus.add_by_sign`). Each step is the same single operation in the sums' dtype as the element-wise one,
the density and weight rounded to that dtype first as torch rounds a Python number, so the bits are theirs:
`tests/test_kernels.py` holds the kernels to them."""

from __future__ import annotations

import numpy as np
from numba import njit

from streammerge.kernels import compiled
from streammerge.kernels.consensus import sign_add
from streammerge.kernels.philox import fill

DRAWS = 1 << 10  # elements drawn at a time (by the vectorised `fill`, into a buffer that stays in L1)


@njit(inline="always", cache=True)
def _kept(x, base, draw, threshold, zero):
    delta = x - base
    return delta if draw < threshold else zero


# The loops run over views that start at their first element and branch on `rescale` outside the loop: indexing
# from an offset, or a branch inside, kept them from vectorising.
@compiled
def _add_span(x, base, total, draws, threshold, density, rescale, weight, zero, first):
    if rescale:
        for j in range(x.size):
            value = (_kept(x[j], base[j], draws[j], threshold, zero) / density) * weight
            total[j] = (zero if first else total[j]) + value
    else:
        for j in range(x.size):
            value = _kept(x[j], base[j], draws[j], threshold, zero) * weight
            total[j] = (zero if first else total[j]) + value


@compiled
def _add_span_by_sign(x, base, positive, negative, weight_positive, weight_negative, draws, threshold, density,
                      rescale, weight, zero, first):
    if rescale:
        for j in range(x.size):
            value = (_kept(x[j], base[j], draws[j], threshold, zero) / density) * weight
            sign_add(value, j, positive, negative, weight_positive, weight_negative, weight, zero, first)
    else:
        for j in range(x.size):
            value = _kept(x[j], base[j], draws[j], threshold, zero) * weight
            sign_add(value, j, positive, negative, weight_positive, weight_negative, weight, zero, first)


@compiled
def add_dropped(x, base, total, start, stream, threshold, density, rescale, weight, first):
    """total += ((x - base) where the draw of the element (start + its index in the stream) is below `threshold`
    (a float64 the values' dtype holds exactly), else +0) [/ density with `rescale`] * weight; for the `first`
    model, total = +0 + that (its contents not read: what adding to a zeroed total gives)."""
    draws = np.empty(DRAWS, dtype=np.float32)
    as_dtype = total.dtype.type
    zero, density, weight = as_dtype(0), as_dtype(density), as_dtype(weight)
    for a in range(0, x.size, DRAWS):
        z = min(x.size, a + DRAWS)
        fill(draws[:z - a], start + a, stream)
        _add_span(x[a:z], base[a:z], total[a:z], draws, threshold, density, rescale, weight, zero, first)


@compiled
def add_dropped_by_sign(x, base, positive, negative, weight_positive, weight_negative, start, stream, threshold,
                        density, rescale, weight, first):
    """`add_dropped`'s weighted task vector, added by sign as `consensus.add_by_sign` adds it (`first` as there)."""
    draws = np.empty(DRAWS, dtype=np.float32)
    as_dtype = positive.dtype.type
    zero, density, weight = as_dtype(0), as_dtype(density), as_dtype(weight)
    for a in range(0, x.size, DRAWS):
        z = min(x.size, a + DRAWS)
        fill(draws[:z - a], start + a, stream)
        _add_span_by_sign(x[a:z], base[a:z], positive[a:z], negative[a:z], weight_positive[a:z],
                          weight_negative[a:z], draws, threshold, density, rescale, weight, zero, first)


def load() -> None:
    """Compile the kernels, or load them from numba's cache, for both accumulation dtypes."""
    stream = np.zeros(4, dtype=np.uint32)
    for dtype in (np.float32, np.float64):
        a = [np.zeros(1, dtype=dtype) for _ in range(6)]
        add_dropped(a[0], a[1], a[2], 0, stream, 0.5, 0.5, True, 1.0, True)
        add_dropped_by_sign(*a, 0, stream, 0.5, 0.5, True, 1.0, True)
