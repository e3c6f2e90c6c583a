"""A streamed selection's one pass over a slice of magnitudes (`streaming.StreamedBrackets`), compiled: the
elements below each range of bit patterns counted, and those inside any range copied out in order. numpy takes
two passes per range for the counts, three more for the ranges' mask and a boolean subscript that branches on
every element: about 0.9 ns an element with one range and 1.7 with two on one core, against 0.5-0.6 here (a
vectorised count and mask per range, then a copy without branches). The same counts and elements:
`tests/test_kernels.py` holds it to numpy's (`streaming.bracket_slice`)."""

from __future__ import annotations

import numpy as np

from streammerge.kernels import compiled


@compiled
def _count_below(part, low):
    count = 0
    for j in range(part.size):
        count += part[j] < low
    return count


@compiled
def _mark_inside(part, low, span, mask, first):
    """mask[j] (or, after the `first` range, mask[j] |=) low <= part[j] <= low + span, as one unsigned comparison
    of part[j] - low (both non-negative: no overflow)."""
    if first:
        for j in range(part.size):
            mask[j] = np.uint64(np.int64(part[j]) - low) <= span
    else:
        for j in range(part.size):
            mask[j] |= np.uint64(np.int64(part[j]) - low) <= span


@compiled
def _compress(part, mask, out):
    """out[:kept] = part[mask], in order, without a branch: every element is stored at the next free place,
    which moves on only past those kept (out is as long as part: the place never passes the element's own)."""
    kept = 0
    for j in range(part.size):
        out[kept] = part[j]
        kept += mask[j]
    return kept


@compiled
def bracket_slice(part, lows, spans, below, mask, out):
    """below[k] += the elements of `part` (non-negative integers: IEEE patterns of magnitudes) under lows[k];
    out[:kept] = those inside any range [lows[k], lows[k] + spans[k]], in order; returns kept. mask: uint8
    scratch as long as part (lows int64, spans uint64, below int64)."""
    for k in range(lows.size):
        below[k] += _count_below(part, lows[k])
        _mark_inside(part, lows[k], spans[k], mask, k == 0)
    return _compress(part, mask, out)


def load() -> None:
    """Compile the kernel, or load it from numba's cache, for the patterns of float32 and float64 magnitudes."""
    for dtype in (np.int32, np.int64):
        one = np.ones(1, dtype=dtype)
        bracket_slice(one, np.zeros(1, np.int64), np.ones(1, np.uint64), np.zeros(1, np.int64),
                      np.zeros(1, np.uint8), one.copy())
