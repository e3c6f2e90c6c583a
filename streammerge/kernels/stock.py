"""Model Stock's merge with one ratio per tensor, compiled: each element's models summed, averaged, scaled by the
ratio and the base's share added in registers in one pass over the inputs, where torch's element-wise operations
took one pass each (copy, an addition per further model, division, multiplication, the base's product, its
addition: `methods/interpolation.py`). The same single operations in the same order, in the inputs' dtype, so the
same bits: `tests/test_kernels.py` holds the kernel to torch's."""

from __future__ import annotations

import numpy as np

from streammerge.kernels import compiled


@compiled
def merge(inputs, base, ratio, base_share, out):
    """out = (sum of the models, in model order) / their count * ratio + base * base_share, `ratio` and
    `base_share` rounded to the arrays' dtype (as torch rounds a Python number). `inputs`: a tuple of the models'
    arrays (compiled once per model count)."""
    count = base.dtype.type(len(inputs))
    scale, share = base.dtype.type(ratio), base.dtype.type(base_share)
    for j in range(base.size):
        total = inputs[0][j]
        for i in range(1, len(inputs)):
            total = total + inputs[i][j]
        out[j] = total / count * scale + base[j] * share


def load(models: tuple[int, ...] = (2, 3)) -> None:
    """Compile the kernel, or load it from numba's cache, for both accumulation dtypes and the usual model counts."""
    for dtype in (np.float32, np.float64):
        one = np.ones(1, dtype=dtype)
        for count in models:
            merge((one,) * count, one, 0.5, 0.5, one.copy())
