"""arcee_fusion's row statistics, compiled: for rows that never straddle a grid block, each row's softmax of the
model and of the base and the KL divergence between them in one pass over the row in the CPU's caches, where
numpy made some twenty passes over each grid block (`methods/arcee_fusion.py`).

numba's own exp and log are the C library's, called one element at a time. `exp_into` and `log_into` are written
here with arithmetic only, so the compiler vectorises their loops: exp by Cody-Waite reduction (x = n ln 2 + r,
|r| <= ln 2 / 2) and the Taylor polynomial of degree 13 (truncation below 1e-17 relative), log by the exponent and
a mantissa m in [sqrt(2) / 2, sqrt(2)), log m = 2 atanh((m - 1) / (m + 1)) by its series to s^12 (s = f^2 <=
0.0295; truncation below 2e-18 relative). Each is within a few units in the last place of the C library's
(`tests/test_kernels.py` measures both); exps below 2^-1022 are 0 or subnormal, less accurate there.

The softmax is torch's: exp(x - max) times the reciprocal of the row's sum of them; its sums, and the KL's, are
taken in eight interleaved lanes added in a fixed order, so a row's result depends on its values alone.

`importance` and `fuse` make the importances and the merge of every row, whatever its length, each in one pass
where torch made three and six."""

from __future__ import annotations

import numpy as np
from numba import njit

from streammerge.kernels import compiled

LN2_HI = 6.93147180369123816490e-01  # ln 2 in two parts: n * LN2_HI is exact for |n| < 2^11
LN2_LO = 1.90821492927058770002e-10
LOG2E = 1.4426950408889634
SQRT2 = 1.4142135623730951
EXP_CLAMP = 1100.0  # beyond +-1100 every exp is 0 or infinite; the clamp keeps n within int64
EXP_TERMS = tuple(1.0 / float(np.prod(np.arange(1, k + 1, dtype=np.float64))) for k in range(14))  # 1 / k!
ROUNDER = 6755399441055744.0  # 1.5 * 2^52: x + ROUNDER rounds x to an integer, held in the sum's low bits
ROUNDER_BITS = 0x4338000000000000
TWO_52 = 4503599627370496.0
TWO_52_BITS = 0x4330000000000000
LOG_TERMS = tuple(1.0 / (2 * k + 3) for k in range(12))  # 1/3, 1/5, ..., 1/25
MANTISSA = (1 << 52) - 1
ONE_BITS = 1023 << 52
LANES = 8


@njit(inline="always", cache=True)
def _exp_polynomial(r):
    """sum_k r^k / k! for k <= 13, by Horner's rule."""
    c = EXP_TERMS
    p = c[13]
    for k in range(12, -1, -1):
        p = p * r + c[k]
    return p


@compiled
def exp_into(x, shift, out, scale_bits):
    """out[j] = exp(x[j] - shift) in float64 (x: float32 or float64; out and scale_bits: float64 and int64 arrays
    as long as x, the latter scratch), for x - shift up to 709 (beyond, +inf); NaN gives NaN, -inf 0. n is rounded
    by adding 1.5 * 2^52, which leaves it in the sum's low bits: no float-to-integer conversion, which the CPU's
    256-bit vector instructions lack."""
    n_elements = x.size
    rounder = scale_bits.view(np.float64)
    for j in range(n_elements):
        v = np.float64(x[j]) - shift
        clamped = min(max(v, -EXP_CLAMP), EXP_CLAMP)
        shifted = clamped * LOG2E + ROUNDER
        n = shifted - ROUNDER
        r = (clamped - n * LN2_HI) - n * LN2_LO
        out[j] = _exp_polynomial(r) if v == v else v
        rounder[j] = shifted
    for j in range(n_elements):
        k = scale_bits[j] - ROUNDER_BITS
        scale_bits[j] = (min(k, 1024) + 1023) << 52 if k >= -1022 else 0  # 2^k; 2^1024 is +inf's bits
    for j in range(n_elements):
        out[j] *= rounder[j]


@compiled
def log_into(y, out, bits_scratch):
    """out[j] = log(y[j]) for positive normal finite y (float64; bits_scratch: int64, as long). The exponent is
    made a float as the low bits of 2^52 + it, for the same reason as `exp_into`'s n."""
    n_elements = y.size
    y_bits, exponent_bits = y.view(np.int64), out.view(np.int64)
    for j in range(n_elements):
        bits_scratch[j] = (y_bits[j] & MANTISSA) | ONE_BITS
        exponent_bits[j] = TWO_52_BITS | (y_bits[j] >> 52)
    mantissas = bits_scratch.view(np.float64)
    for j in range(n_elements):
        exponent = out[j] - (TWO_52 + 1023.0)
        m = mantissas[j]
        if m > SQRT2:
            m = m * 0.5
            exponent += 1.0
        f = (m - 1.0) / (m + 1.0)
        s = f * f
        series = LOG_TERMS[11]  # sum_k s^k / (2k + 3) for k <= 11, by Horner's rule
        for k in range(10, -1, -1):
            series = series * s + LOG_TERMS[k]
        twice_f = f + f
        out[j] = exponent * LN2_HI + (twice_f + (twice_f * s * series + exponent * LN2_LO))


@njit(inline="always", cache=True)
def _lane_sum(values, lanes):
    """The sum of `values` (float64) in LANES interleaved partial sums (element j to lane j % LANES), then lane 0 +
    lane 1 + ... in order: independent additions that the compiler vectorises, in an order fixed by the length."""
    lanes[:] = 0.0
    n = values.size
    whole = n - n % LANES
    for j in range(0, whole, LANES):
        for lane in range(LANES):
            lanes[lane] += values[j + lane]
    for j in range(whole, n):
        lanes[j - whole] += values[j]
    total = lanes[0]
    for lane in range(1, LANES):
        total += lanes[lane]
    return total


@njit(inline="always", cache=True)
def _row_max(row, lanes):
    """The row's max in float64 (NaN ignored), in LANES interleaved lanes as `_lane_sum`."""
    lanes[:] = -np.inf
    n = row.size
    whole = n - n % LANES
    for j in range(0, whole, LANES):
        for lane in range(LANES):
            v = np.float64(row[j + lane])
            lanes[lane] = v if v > lanes[lane] else lanes[lane]
    for j in range(whole, n):
        v = np.float64(row[j])
        lanes[0] = v if v > lanes[0] else lanes[0]
    top = lanes[0]
    for lane in range(1, LANES):
        top = max(top, lanes[lane])
    return top


@compiled
def row_kl(x, base, period, eps, out):
    """out[r] = sum_j p_j log(p_j / q_j) over row r (elements [r * period, (r + 1) * period) of the 1-D x and base,
    float32 or float64), p = softmax(x row) + eps, q = softmax(base row) + eps, in float64; NaN for a row holding a
    NaN or +inf, or only -inf, in either (a NaN or infinite input makes the softmax NaN)."""
    ex = np.empty(period, dtype=np.float64)
    eb = np.empty(period, dtype=np.float64)
    terms = np.empty(period, dtype=np.float64)
    bits = np.empty(period, dtype=np.int64)
    lanes = np.empty(LANES, dtype=np.float64)
    for r in range(x.size // period):
        row_x, row_b = x[r * period:(r + 1) * period], base[r * period:(r + 1) * period]
        top_x, top_b = _row_max(row_x, lanes), _row_max(row_b, lanes)
        exp_into(row_x, top_x, ex, bits)
        exp_into(row_b, top_b, eb, bits)
        sum_x, sum_b = _lane_sum(ex, lanes), _lane_sum(eb, lanes)
        # a NaN makes its sum NaN; +inf, or only -inf, leaves a max that is not finite
        if not (abs(top_x) < np.inf and abs(top_b) < np.inf and sum_x == sum_x and sum_b == sum_b):
            out[r] = np.nan
            continue
        inverse_x, inverse_b = 1.0 / sum_x, 1.0 / sum_b
        for j in range(period):
            p = ex[j] * inverse_x + eps
            ex[j] = p
            terms[j] = p / (eb[j] * inverse_b + eps)
        log_into(terms, eb, bits)
        for j in range(period):
            terms[j] = ex[j] * eb[j]
        out[r] = _lane_sum(terms, lanes)


@njit(inline="always", cache=True)
def _row_weight(kl, period, offset, j, n):
    """The KL of the row that chunk element j (tensor element offset + j) is in, and where that row ends in the
    chunk (at most n)."""
    row = (offset + j) // period
    return kl[row], min(n, (row + 1) * period - offset)


@compiled
def importance(x, base, kl, period, offset, out):
    """out[j] = |(x[j] - base[j]) * kl[r]|, r the row of element offset + j of the tensor (rows of `period`
    elements; all arrays in the accumulation dtype): torch's sub, mul and abs, the same bits, in one pass."""
    j = 0
    while j < x.size:
        weight, stop = _row_weight(kl, period, offset, j, x.size)
        for i in range(j, stop):
            out[i] = abs((x[i] - base[i]) * weight)
        j = stop


@compiled
def fuse(x, base, kl, period, offset, threshold, out):
    """out[j] = base[j] + (x[j] - base[j]) * keep, keep 1 where the importance (as `importance`) reaches
    `threshold` (a scalar of the arrays' dtype, as torch compares with a Python float), else 0: the merge's
    operations (a NaN importance keeps nothing; a NaN delta stays NaN), the same bits, in one pass."""
    one, zero = out.dtype.type(1), out.dtype.type(0)
    j = 0
    while j < x.size:
        weight, stop = _row_weight(kl, period, offset, j, x.size)
        for i in range(j, stop):
            delta = x[i] - base[i]
            out[i] = delta * (one if abs(delta * weight) >= threshold else zero) + base[i]
        j = stop


def load() -> None:
    """Compile the kernels, or load them from numba's cache, for both accumulation dtypes."""
    scratch = np.zeros(1, dtype=np.float64), np.zeros(1, dtype=np.int64)
    log_into(np.ones(1), *scratch)
    for dtype in (np.float32, np.float64):
        one = np.zeros(1, dtype=dtype)
        exp_into(one, 0.0, *scratch)
        row_kl(one, one, 1, 1e-8, np.zeros(1, dtype=np.float64))
        importance(one, one, one, 1, 0, one)
        fuse(one, one, one, 1, 0, dtype(0), one)
