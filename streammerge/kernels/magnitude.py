"""The task-vector methods with a magnitude sparsifier, compiled. TIES (`ties`, `breadcrumbs_ties`): for each
element, every model's task vector made, set to +0 outside that model's selected magnitude bounds, rescaled and
weighted, summed by sign in registers, the sign elected and the base added, in one pass over the inputs, where
element-wise operations take one each (subtract the base, take the magnitude, compare with each bound, mask,
multiply, add by sign: the four sums of `consensus.add_by_sign` written and read again for each model, then
`consensus.finish`). The same single operations in the same order, in the sums' dtype, so the same bits:
`tests/test_kernels.py` holds the kernels to them. Without sign consensus (`breadcrumbs`), the kept deltas are
summed in registers the same way (`merge_within`) where torch's operations took a pass each; with every delta kept
and none rescaled, that is `task_arithmetic`'s whole merge. With them, the kernels that place the ties their bounds
admit by position."""

from __future__ import annotations

import numpy as np
from numba import njit

from streammerge.kernels import compiled
from streammerge.kernels.consensus import by_sign, ended_by_sign, ended_sum


@njit(inline="always", cache=True)
def kept(x, b, low, high, keep_all, factor, zero, one):
    """A model's delta x - b where low <= |delta| <= high or `keep_all`, else +0; times `factor` where that is not 1."""
    delta = x - b
    magnitude = abs(delta)
    value = delta if ((low <= magnitude) & (magnitude <= high)) | keep_all else zero
    return value * factor if factor != one else value


@compiled
def merge_within_by_sign(inputs, base, lows, highs, keep_all, factors, weights, out, normalize, scale):
    """out = base + the elected sum of the models' kept deltas, as `consensus.finish` makes it from the sums
    `consensus.add_by_sign` adds them to: model i's delta `inputs[i] - base` kept where lows[i] <= |delta| <=
    highs[i] (bounds of the values' dtype: an exclusive bound is the next value inward; NaN is within no bounds),
    or everywhere with keep_all[i] (NaN included), else +0; times factors[i] where that is not 1, then weights[i]
    (both rounded to the values' dtype). `inputs`: a tuple of the models' arrays (compiled once per model count)."""
    zero, one = base.dtype.type(0), base.dtype.type(1)
    factor = base.dtype.type(scale)
    scaled = scale != 1
    for j in range(base.size):
        b = base[j]
        sums = (zero, zero, zero, zero)  # (consensus.sign_add's, from +0 as for the first model, in model order)
        for i in range(len(inputs)):
            value = kept(inputs[i][j], b, lows[i], highs[i], keep_all[i], factors[i], zero, one) * weights[i]
            sums = by_sign(value, weights[i], sums, zero)
        out[j] = ended_by_sign(sums, b, normalize, factor, scaled, zero, one)


@compiled
def merge_within(inputs, base, lows, highs, keep_all, factors, weights, out, normalize, divisor, scale):
    """out = base + the sum of the models' kept deltas, as `task_vectors.task_vector_merge` makes it without sign
    consensus: each model's delta kept, rescaled and weighted as in `merge_within_by_sign`, added in model order
    to +0; divided by `divisor` with `normalize`, times `scale` where that is not 1 (both rounded to the values'
    dtype), the base added."""
    zero, one = base.dtype.type(0), base.dtype.type(1)
    divide, factor = base.dtype.type(divisor), base.dtype.type(scale)
    scaled = scale != 1
    for j in range(base.size):
        b = base[j]
        total = zero
        for i in range(len(inputs)):
            total = total + kept(inputs[i][j], b, lows[i], highs[i], keep_all[i], factors[i], zero, one) * weights[i]
        out[j] = ended_sum(total, b, normalize, divide, factor, scaled)


@compiled
def count_equal(x, base, value):
    """How many elements have |x - base| == value."""
    count = 0
    for j in range(x.size):
        count += abs(x[j] - base[j]) == value
    return count


@compiled
def index_of_equal(x, base, value, k):
    """The index of the k-th (0-based) element with |x - base| == value, or x.size where there are not so many."""
    for j in range(x.size):
        if abs(x[j] - base[j]) == value:
            if k == 0:
                return j
            k -= 1
    return x.size


def load(models: tuple[int, ...] = (2, 3)) -> None:
    """Compile the kernels, or load them from numba's cache, for both accumulation dtypes (the merge for the
    usual model counts: another count is compiled on its first merge, then cached too)."""
    for dtype in (np.float32, np.float64):
        one = np.ones(1, dtype=dtype)
        for count in models:
            flags, numbers = np.zeros(count, dtype=np.bool_), np.ones(count, dtype=dtype)
            merge_within_by_sign((one,) * count, one, numbers, numbers, flags, numbers, numbers, one.copy(), True, 1.0)
            merge_within((one,) * count, one, numbers, numbers, flags, numbers, numbers, one.copy(), True, 1.0, 1.0)
        count_equal(one, one, one[0])
        index_of_equal(one, one, one[0], 0)
