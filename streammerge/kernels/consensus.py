"""TIES sign consensus, one pass per model and one to elect and end the merge (normalise, lambda, base), instead
of the eight and fourteen torch and numpy operations it takes element-wise (`task_vectors.task_vector_merge`
documents the arithmetic); or, where every model's weighted delta is at hand at once, the sums in registers and the
end in the same pass (`merge_by_sign`, and `merge_sum` for the plain sum). Each sum is the same single float
addition in the same order as those operations, so the bits are theirs: `tests/test_kernels.py` holds the kernels
to them, zeros of either sign, NaN and infinities included."""

from __future__ import annotations

import numpy as np
from numba import njit

from streammerge.kernels import compiled


@njit(inline="always", cache=True)
def by_sign(value, weight, sums, zero):
    """The four sums (positive, negative, weight_positive, weight_negative) with a weighted delta added: its
    positive part to `positive`, its negative part to `negative` (a NaN to both), `weight` to `weight_positive`
    where it is above zero, to `weight_negative` where below (+0 added elsewhere: the same additions in order)."""
    positive, negative, weight_positive, weight_negative = sums
    return (positive + (zero if value < zero else value), negative + (zero if value > zero else value),
            weight_positive + (weight if value > zero else zero), weight_negative + (weight if value < zero else zero))


@njit(inline="always", cache=True)
def sign_add(x, j, positive, negative, weight_positive, weight_negative, weight, zero, first):
    """Element j of `add_by_sign`, for the weighted delta x. With `first` the sums are not read but start at +0:
    what adding to zeroed sums gives (+0 + -0 is +0), without a pass to zero them."""
    sums = ((zero, zero, zero, zero) if first
            else (positive[j], negative[j], weight_positive[j], weight_negative[j]))
    positive[j], negative[j], weight_positive[j], weight_negative[j] = by_sign(x, weight, sums, zero)


@compiled
def add_by_sign(delta, positive, negative, weight_positive, weight_negative, weight, first):
    """Add one model's weighted delta: its positive part to `positive`, its negative part to `negative` (a NaN
    to both), and `weight` to `weight_positive` where it is above zero, to `weight_negative` where below; the
    `first` model's to sums of +0 (their contents not read)."""
    zero = delta.dtype.type(0)
    w = delta.dtype.type(weight)  # (rounded to the buffers' dtype, as torch rounds a Python number)
    for j in range(delta.size):
        sign_add(delta[j], j, positive, negative, weight_positive, weight_negative, w, zero, first)


@njit(inline="always", cache=True)
def elected(positive, negative, weight_positive, weight_negative, zero, one):
    """The elected sign is + where positive + negative >= 0 (not where that sum is NaN): that sign's sum and its
    weight, or 1 where that is zero (nothing to normalise)."""
    up = positive + negative >= zero
    weight = weight_positive if up else weight_negative
    return (positive if up else negative), (one if weight == zero else weight)


@njit(inline="always", cache=True)
def ended_by_sign(sums, b, normalize, factor, scaled, zero, one):
    """b + the elected sum of `sums` (`elected`), divided by its weight with `normalize`, times `factor` where
    `scaled`: the end of a merge with sign consensus for one element."""
    chosen, weight = elected(sums[0], sums[1], sums[2], sums[3], zero, one)
    value = chosen / weight if normalize else chosen  # (selects: both sides are computed, the loop vectorises)
    return b + (value * factor if scaled else value)


@njit(inline="always", cache=True)
def ended_sum(total, b, normalize, divide, factor, scaled):
    """b + the total, divided by `divide` with `normalize`, times `factor` where `scaled`: the end of a merge
    without sign consensus for one element."""
    value = total / divide if normalize else total
    return b + (value * factor if scaled else value)


@compiled
def finish(positive, negative, weight_positive, weight_negative, base, normalize, scale):
    """positive = base + the elected sum (`elected`) [/ its weight with `normalize`] [* scale where it is not 1]:
    the election, the division, the multiplication by the merge's lambda and the addition of the base in one pass,
    written over the positive sum (an output array of its own that is the positive sum would keep the loop from
    vectorising: the compiler's overlap check fails and the scalar loop runs, five times slower)."""
    zero, one = positive.dtype.type(0), positive.dtype.type(1)
    factor = positive.dtype.type(scale)  # (rounded to the buffers' dtype, as torch rounds a Python number)
    scaled = scale != 1
    for j in range(positive.size):
        sums = (positive[j], negative[j], weight_positive[j], weight_negative[j])
        positive[j] = ended_by_sign(sums, base[j], normalize, factor, scaled, zero, one)


@compiled
def merge_by_sign(deltas, weights, base, normalize, scale):
    """deltas[0] = base + the elected sum of the weighted deltas deltas[i] * weights[i] (weights in the values'
    dtype), as `add_by_sign` and `finish` make it, the sums from +0 in registers. `deltas`: a tuple of the models'
    arrays (compiled once per model count). (Written over the first, as `finish` writes over its sum: an output
    array of its own that is one of them would keep the loop from vectorising, ten times slower.)"""
    zero, one = base.dtype.type(0), base.dtype.type(1)
    factor = base.dtype.type(scale)
    scaled = scale != 1
    for j in range(base.size):
        sums = (zero, zero, zero, zero)
        for i in range(len(deltas)):
            sums = by_sign(deltas[i][j] * weights[i], weights[i], sums, zero)
        deltas[0][j] = ended_by_sign(sums, base[j], normalize, factor, scaled, zero, one)


@compiled
def merge_sum(deltas, weights, base, normalize, divisor, scale):
    """deltas[0] = base + the sum of the weighted deltas, as a merge without sign consensus makes it: added in model
    order to +0, divided by `divisor` with `normalize`, times `scale` where that is not 1 (both rounded to the
    values' dtype). `deltas` as for `merge_by_sign`."""
    zero = base.dtype.type(0)
    divide, factor = base.dtype.type(divisor), base.dtype.type(scale)
    scaled = scale != 1
    for j in range(base.size):
        total = zero
        for i in range(len(deltas)):
            total = total + deltas[i][j] * weights[i]
        deltas[0][j] = ended_sum(total, base[j], normalize, divide, factor, scaled)


def load(models: tuple[int, ...] = (2, 3)) -> None:
    """Compile the kernels, or load them from numba's cache, for both accumulation dtypes (the merges of all
    models' deltas at once for the usual model counts: another count is compiled on its first merge, then cached)."""
    for dtype in (np.float32, np.float64):
        a = [np.zeros(1, dtype=dtype) for _ in range(6)]
        add_by_sign(*a[:5], 1.0, True)
        finish(*a[:5], True, 1.0)
        for count in models:
            weights = np.ones(count, dtype=dtype)
            merge_by_sign((a[0],) * count, weights, a[1], True, 1.0)
            merge_sum((a[0],) * count, weights, a[1], True, 1.0, 1.0)
