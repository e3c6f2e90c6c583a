"""ram and ramplus_tl, compiled: each element's task vectors, their changed flags, count, sum and rescaled sum made
in registers in one pass over the inputs, where torch's element-wise operations took six or seven per model and
three more (`methods/ram.py`); the counts of ramplus_tl's statistics pass the same way. The same single operations
in the same order, in the inputs' dtype, so the same bits: `tests/test_kernels.py` holds the kernels to torch's."""

from __future__ import annotations

import numpy as np

from streammerge.kernels import compiled


@compiled
def count_changes(inputs, base, epsilon, counts):
    """counts[0, i] += the elements only model i changed, counts[1, i] += those model i changed with others
    (changed: |inputs[i] - base| > epsilon, a scalar of the arrays' dtype; a NaN delta is not a change).
    `inputs`: a tuple of the models' arrays (compiled once per model count)."""
    n_models = len(inputs)
    changed = np.zeros(n_models, dtype=np.bool_)
    for j in range(base.size):
        b = base[j]
        count = 0
        for i in range(n_models):
            changed[i] = abs(inputs[i][j] - b) > epsilon
            count += changed[i]
        if count == 1:
            for i in range(n_models):
                counts[0, i] += changed[i]
        elif count > 1:
            for i in range(n_models):
                counts[1, i] += changed[i]


@compiled
def merge(inputs, base, epsilon, scales, rescale, out):
    """out = base + each element's changed deltas (delta times 1 or 0, as torch masks them: a NaN delta stays NaN)
    summed over the models and divided by how many changed it (at least 1); with `rescale`, an element only one
    model changed gets instead the sum of the deltas each times its model's scale (scales: the arrays' dtype)."""
    zero, one = base.dtype.type(0), base.dtype.type(1)
    for j in range(base.size):
        b = base[j]
        count, shared, scaled = zero, zero, zero
        for i in range(len(inputs)):
            delta = inputs[i][j] - b
            changed = one if abs(delta) > epsilon else zero
            value = delta * changed
            count = count + changed
            shared = shared + value
            scaled = scaled + value * scales[i]
        mixed = scaled if rescale and count == one else shared / max(count, one)
        out[j] = mixed + b


def load(models: tuple[int, ...] = (2, 3)) -> None:
    """Compile the kernels, or load them from numba's cache, for both accumulation dtypes and the usual model
    counts (another count is compiled on its first merge, then cached too)."""
    for dtype in (np.float32, np.float64):
        one = np.ones(1, dtype=dtype)
        for count in models:
            inputs, scales = (one,) * count, np.ones(count, dtype=dtype)
            count_changes(inputs, one, dtype(0), np.zeros((2, count), dtype=np.int64))
            merge(inputs, one, dtype(0), scales, True, one.copy())
