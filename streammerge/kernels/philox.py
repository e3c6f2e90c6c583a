"""Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011; Random123's
`philox4x32_10`), compiled by numba: the counter-based generator behind `streaming.Uniform`.

Philox4x32 takes 32x32->64-bit products, which vectorise on every x86 and ARM CPU, so a compiled loop over
counters makes a number in well under a nanosecond, where numpy's Philox4x64 (64x64->128-bit products, one at a
time) takes 3-4 ns. Element `e` of a stream takes word `e % 4` of the block at counter (e // 4 as two words,
then the stream's two nonce words), under the stream's two key words; a word `w` gives the float32
`(w >> 8) / 2**24` in [0, 1), exactly. `tests/test_streaming.py` checks the blocks against Random123's
known-answer vectors and a Philox written with numpy's integer arithmetic.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from streammerge.kernels import compiled

MULTIPLIERS = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
KEY_BUMPS = (np.uint32(0x9E3779B9), np.uint32(0xBB67AE85))
ROUNDS = 10
LOW = np.uint64(0xFFFFFFFF)
TO_UNIT = np.float32(1.0 / (1 << 24))  # a word's top 24 bits, as a float32 in [0, 1)


@njit(inline="always", cache=True)
def _block(c0, c1, c2, c3, k0, k1):
    """The four 32-bit words of Philox4x32-10 at counter (c0, c1, c2, c3) under key (k0, k1)."""
    m0, m1 = MULTIPLIERS
    for _ in range(ROUNDS):
        p0, p1 = m0 * np.uint64(c0), m1 * np.uint64(c2)
        c0, c1, c2, c3 = (np.uint32(p1 >> np.uint64(32)) ^ c1 ^ k0, np.uint32(p1 & LOW),
                          np.uint32(p0 >> np.uint64(32)) ^ c3 ^ k1, np.uint32(p0 & LOW))
        k0, k1 = np.uint32(k0 + KEY_BUMPS[0]), np.uint32(k1 + KEY_BUMPS[1])
    return c0, c1, c2, c3


@njit(inline="always", cache=True)
def _unit(word):
    return np.float32(word >> np.uint32(8)) * TO_UNIT


@njit(inline="always", cache=True)
def _block_units(index, n0, n1, k0, k1):
    """The four numbers of block `index` of the stream with nonce (n0, n1) and key (k0, k1)."""
    index = np.uint64(index)
    w0, w1, w2, w3 = _block(np.uint32(index & LOW), np.uint32(index >> np.uint64(32)), n0, n1, k0, k1)
    return _unit(w0), _unit(w1), _unit(w2), _unit(w3)


@njit(inline="always", cache=True)
def _unit_at(element, n0, n1, k0, k1):
    """The number of one element (the ends of a range that do not fill a block)."""
    units = _block_units(element // 4, n0, n1, k0, k1)
    part = element % 4
    return units[0] if part == 0 else units[1] if part == 1 else units[2] if part == 2 else units[3]


# The kernels take the stream as four uint32 (n0, n1, k0, k1) and pass them on as scalars: read from an array
# inside the loop, they could alias the output, which keeps the compiler from vectorising it. The whole blocks go
# to a loop of their own over a view that starts at the first of them (indexing the whole array from an offset
# kept that loop scalar too).
@compiled
def _fill_blocks(out, first, n0, n1, k0, k1):
    for b in range(out.size // 4):
        u0, u1, u2, u3 = _block_units(first + b, n0, n1, k0, k1)
        o = 4 * b
        out[o] = u0
        out[o + 1] = u1
        out[o + 2] = u2
        out[o + 3] = u3


@compiled
def fill(out, start, stream):
    """out[i] = the number of element start + i, for a float32 array `out`."""
    n0, n1, k0, k1 = stream[0], stream[1], stream[2], stream[3]
    n = out.size
    head = min(-start % 4, n)
    for i in range(head):
        out[i] = _unit_at(start + i, n0, n1, k0, k1)
    end = head + (n - head) // 4 * 4
    _fill_blocks(out[head:end], (start + head) // 4, n0, n1, k0, k1)
    for i in range(end, n):
        out[i] = _unit_at(start + i, n0, n1, k0, k1)


def load() -> None:
    """Compile the kernels, or load them from numba's cache, for every type the merges call them with (a first
    call does it: about 2 s per kernel and type to compile, 0.3 s in all to load from the cache)."""
    fill(np.empty(1, dtype=np.float32), 0, np.zeros(4, dtype=np.uint32))
