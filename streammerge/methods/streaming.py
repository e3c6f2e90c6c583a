"""Whole-tensor statistics and reproducible randomness for methods that see a tensor chunk by chunk.

Everything here is computed per block of a fixed grid (`GRID` elements, aligned to the start of the tensor)
and combined in block order, so results depend on the data alone, never on where chunks begin and end:
- `GroupSums`: float64 sums of per-element quantities over the whole tensor, its rows or its columns;
- `Uniform`: uniform random numbers from a counter-based generator (Philox4x32) keyed by (seed, tensor, stream),
  element i taking the stream's i-th number;
- `RankSelect`: exact order statistics of magnitudes by radix selection over their bit patterns, a histogram of
  16 bits per pass (2 passes for float32, 4 for float64), instead of sorting the whole tensor; a tensor held
  whole in one chunk is selected on at once instead (the same order statistics, in one read): all of its keys
  partitioned, or, where numpy's partition is the slower way on this machine, the few inside ranges that a sample
  says hold the ranks (all of them where a range misses);
- `TieGate`: which of the elements equal to a selected value are kept, by their order of appearance.
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import torch

from streammerge.cpu import MAX_THREADS, pool_threads
from streammerge.methods.masks import INT_VIEW, compare
from streammerge.methods.method import GRID

DIGIT_BITS = 16
BINS = 1 << DIGIT_BITS
PACK_FORMATS = {32: ("<i", "<f"), 64: ("<q", "<d")}  # (integer, float) of each width, for struct


def require_grid(offset: int) -> None:
    """Chunks start on the grid: per-block sums and draws depend on it."""
    if offset % GRID:
        raise RuntimeError(f"chunk offset {offset} is not on the {GRID}-element grid")


def grid_blocks(offset: int, n: int):
    """(local start, local stop) of the grid blocks that make up the chunk [offset, offset + n)."""
    require_grid(offset)
    for start in range(0, n, GRID):
        yield start, min(n, start + GRID)


def bool_views(buffer: torch.Tensor, n: int) -> list[torch.Tensor]:
    """As many n-element bool masks as fit in one scratch buffer of the accumulation dtype (4 or 8)."""
    raw = buffer.view(torch.uint8)
    per = raw.numel() // buffer.element_size()
    return [raw[i * per:i * per + n].view(torch.bool) for i in range(buffer.element_size())]


# -- vectors of a tensor -------------------------------------------------------------------------------------
class Groups:
    """How a tensor's elements fall into vectors for per-vector statistics: the whole tensor ("tensor"), vectors
    along the last dimension ("rows"), or vectors along the first dimension ("columns"). A 1-D tensor is one
    vector either way."""

    def __init__(self, kind: str, shape: tuple):
        numel = math.prod(shape)
        self.kind = kind if len(shape) >= 2 and numel else "tensor"
        if self.kind == "rows":
            self.period, self.count = shape[-1], numel // shape[-1]
        elif self.kind == "columns":
            self.period = numel // shape[0]
            self.count = self.period
        else:
            self.period, self.count = max(numel, 1), 1

    def pieces(self, start: int, stop: int):
        """Split the element range into (start, stop, full) pieces: `full` pieces are whole periods."""
        p = self.period
        a = start
        if a % p:
            b = min(stop, (a // p + 1) * p)
            yield a, b, False
            a = b
        end = a + (stop - a) // p * p
        if end > a:
            yield a, end, True
            a = end
        if a < stop:
            yield a, stop, False

    def accumulate(self, sums: torch.Tensor, start: int, values: torch.Tensor) -> None:
        """sums[group] += sum of `values` (elements start.. of the tensor) in each group, in float64."""
        if self.kind == "tensor":
            sums[0] += values.sum(dtype=torch.float64)
            return
        p = self.period
        for a, b, full in self.pieces(start, start + values.numel()):
            part = values[a - start:b - start]
            if self.kind == "rows":
                if full:
                    sums[a // p:b // p] += part.view(-1, p).sum(1, dtype=torch.float64)
                else:
                    sums[a // p] += part.sum(dtype=torch.float64)
            elif full:
                sums += part.view(-1, p).sum(0, dtype=torch.float64)
            else:
                sums[a % p:a % p + (b - a)] += part.to(torch.float64)

    def expand(self, values: torch.Tensor, start: int, out: torch.Tensor) -> torch.Tensor:
        """Per-element copy of per-group `values` for the elements [start, start + out.numel())."""
        p = self.period
        for a, b, full in self.pieces(start, start + out.numel()):
            part = out[a - start:b - start]
            if self.kind == "tensor":
                part.fill_(values[0])
            elif self.kind == "rows":
                if full:
                    part.view(-1, p).copy_(values[a // p:b // p, None].expand(-1, p))
                else:
                    part.fill_(values[a // p])
            elif full:
                part.view(-1, p).copy_(values[None, :].expand((b - a) // p, -1))
            else:
                part.copy_(values[a % p:a % p + (b - a)])
        return out


SUM_BATCH = 4  # grid blocks summed per call (their float64 temporaries: 1 MiB for the halves of 4 blocks)
COMPILED_SUM_BATCH = 64  # grid blocks summed per call by the compiled kernel (a half block's temporary per thread)


def pairwise_sums(values: torch.Tensor) -> torch.Tensor:
    """Float64 sums along dimension 1 of a [k, m, p] view (m a power of two) by a fixed pairwise tree of
    element-wise additions: the same bits whatever k, the thread count or the machine (torch's own reductions
    split work between threads differently as those change). In numpy, whose calls cost a fraction of torch's
    on the small arrays of the tree's upper levels (IEEE additions: the same bits either way)."""
    array = values.numpy()
    half = array.shape[1] // 2
    if half == 0:
        return torch.from_numpy(array[:, 0].astype(np.float64))
    acc = array[:, :half].astype(np.float64)
    acc += array[:, half:]
    while acc.shape[1] > 1:
        half = acc.shape[1] // 2
        acc = np.add(acc[:, :half], acc[:, half:], out=acc[:, :half])
    return torch.from_numpy(acc[:, 0])


def compiled_pairwise_sums(values: torch.Tensor) -> torch.Tensor:
    """`pairwise_sums` by the compiled kernel (`kernels.pairwise`: the same additions, so the same bits), its
    blocks split between the merge's threads."""
    from streammerge.kernels import pairwise  # (numba: imported by the methods that load it)
    array = values.numpy()
    out = np.empty((array.shape[0], array.shape[2]), dtype=np.float64)
    in_parallel(array.shape[0], lambda a, z: pairwise.block_sums(array[a:z], out[a:z]), grain=1)
    return torch.from_numpy(out)


def padded_rows(values: torch.Tensor, width: int) -> torch.Tensor:
    """`values` (whole rows of `width` elements) as a [1, m, width] view, m the next power of two of its row
    count, padded with zero rows where needed.

    The tree of `pairwise_sums` over a grid block that ends with zeros first adds those zeros to the values,
    level by level, until the length is that power of two, then sums the rest as over the shorter block: the same
    additions on the same values. x + 0 is x exactly; only a zero's sign can differ (-0 + 0 is +0), and sums
    that start at +0 never show it. So a short last block is summed over m rows instead of a whole grid block
    of zeros, with the same bits."""
    rows = values.numel() // width
    m = 1 << (rows - 1).bit_length()
    if m == rows:
        return values.view(1, m, width)
    padded = torch.zeros(m * width, dtype=values.dtype)
    padded[:values.numel()].copy_(values)
    return padded.view(1, m, width)


GROUP_SLICE = 1 << 14  # groups whose per-group values are made at a time (`per_group`)
GROUP_WORK_BYTES = 16 * 8  # what making them takes at most per group of a slice: a few float64 temporaries


def group_stats_bytes(groups: Groups, per_group_bytes: int) -> int:
    """What statistics of `per_group_bytes` per group hold, with the making of per-group values from them, a slice
    of groups at a time (none for a whole-tensor group: a few numbers). For `Method.stats_bytes`."""
    if groups.count == 1:
        return 0
    return groups.count * per_group_bytes + min(groups.count, GROUP_SLICE) * GROUP_WORK_BYTES


def group_slices(start: int, stop: int):
    """The groups [start, stop) as slices of at most GROUP_SLICE: per-group arithmetic made a slice at a time keeps
    its temporaries a few hundred KiB however many groups there are."""
    for a in range(start, stop, GROUP_SLICE):
        yield slice(a, min(stop, a + GROUP_SLICE))


def per_group(count: int, dtype: torch.dtype, make: Callable[[slice], tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    """Per-group values (coefficients, ratios) of `count` groups in `dtype`: make(groups) gives them in float64 for
    a slice of the groups, GROUP_SLICE at a time, so the temporaries of their arithmetic stay a few hundred KiB
    however many groups there are (a [3072, 1024, 1] weight has 3 million rows); stored in `dtype` once, as the
    merge multiplies by them (the same rounding as converting the whole at each chunk)."""
    values: list[torch.Tensor] = []
    for groups in group_slices(0, count):
        made = make(groups)
        if not values:
            values = [torch.empty(count, dtype=dtype) for _ in made]
        for value, part in zip(values, made):
            value[groups] = part
    return values


class GroupSums:
    """Float64 sums of several per-element quantities over the groups of a tensor. Each grid block is summed on
    its own (`pairwise_sums`) and the block sums are added in block order, so the sums depend on the data alone,
    never on the chunking. A chunk's blocks are summed a few at a time in one call where the groups allow (the
    whole tensor; rows or column periods that divide the grid), else block by block. With `compiled`, the blocks
    are summed by `compiled_pairwise_sums` (for a method that loads `kernels.pairwise`)."""

    def __init__(self, groups: Groups, quantities: int, compiled: bool = False):
        self.groups = groups
        self.sums = torch.zeros(quantities, groups.count, dtype=torch.float64)
        self.pairwise_sums = compiled_pairwise_sums if compiled else pairwise_sums
        self.batch = COMPILED_SUM_BATCH if compiled else SUM_BATCH

    def add(self, quantity: int, offset: int, values: torch.Tensor) -> None:
        require_grid(offset)
        groups, sums = self.groups, self.sums[quantity]
        p = groups.period
        if groups.kind == "tensor" or GRID % p == 0:
            for a in range(0, values.numel(), self.batch * GRID):
                self._add_blocks(sums, offset + a, values[a:a + self.batch * GRID])
        else:
            for a, b in grid_blocks(offset, values.numel()):
                groups.accumulate(sums, offset + a, values[a:b])

    def add_products(self, offset: int, n: int, vector: Callable[[int, torch.Tensor | None], torch.Tensor],
                     pairs: list[tuple[int, int]], product: torch.Tensor, first: torch.Tensor | None = None,
                     second: torch.Tensor | None = None) -> None:
        """add(q, offset, v_i * v_j) for every quantity q, (i, j) = pairs[q], over n elements of vectors v_i =
        vector(i, buffer): a view, or computed into `buffer` (first or second: chunk-sized scratch buffers that
        vectors computed on the fly need); product: chunk-sized scratch. Within one grid block of a whole-tensor
        sum, all the products are formed in one call and summed in another."""
        if self._one_block(n, len(pairs)):
            vectors = np.zeros((1 + max(max(p) for p in pairs), 1 << (n - 1).bit_length()),
                               dtype=product.numpy().dtype)  # padded with zeros to a power of two: +0 products
            for i, row in enumerate(vectors):
                destination = torch.from_numpy(row[:n])
                v = vector(i, destination)
                if v.data_ptr() != destination.data_ptr():
                    destination.copy_(v)
            left, right = zip(*pairs)
            self._add_block(offset, vectors[list(left)] * vectors[list(right)])  # (IEEE products: torch.mul's bits)
            return
        computed, a_index = None, None
        for q, (i, j) in sorted(enumerate(pairs), key=lambda entry: entry[1]):  # each v_i in `first` while it serves
            if i != a_index:
                computed, a_index = vector(i, first), i
            b = computed if j == i else vector(j, second)
            self.add(q, offset, torch.mul(computed, b, out=product[:n]))

    def add_vector_products(self, offset: int, n: int, inputs: list[torch.Tensor], base: torch.Tensor | None,
                            pairs: list[tuple[int, int]], product: torch.Tensor, first: torch.Tensor | None = None,
                            second: torch.Tensor | None = None) -> None:
        """`add_products` of the vectors v_i = inputs[i] - base, or inputs[i] where base is None (n elements
        each). Whole-tensor compiled sums form the vectors and their products inside the kernel's first level
        (`kernels.pairwise`), a grid block at a time, instead of chunk-sized arrays of differences and products;
        otherwise as `add_products` (the buffers: its scratch; first and second serve the differences)."""
        if self.groups.kind != "tensor" or self.pairwise_sums is not compiled_pairwise_sums:
            vector = ((lambda i, buffer: inputs[i]) if base is None else
                      (lambda i, buffer: torch.sub(inputs[i], base, out=buffer[:n])))
            self.add_products(offset, n, vector, pairs, product, first, second)
            return
        require_grid(offset)
        from streammerge.kernels import pairwise
        vectors, base_values = tuple(x.numpy()[:n] for x in inputs), None if base is None else base.numpy()[:n]
        left, right = (np.array(side, dtype=np.int64) for side in zip(*pairs))
        block_sums = np.empty((-(-n // GRID), len(pairs)), dtype=np.float64)

        def work(a: int, z: int) -> None:
            elements = slice(a * GRID, min(n, z * GRID))
            block_base = None if base_values is None else base_values[elements]
            pairwise.product_block_sums(tuple(v[elements] for v in vectors), block_base, left, right, GRID,
                                        block_sums[a:z])

        in_parallel(block_sums.shape[0], work, grain=1)
        self.add_block_sums(block_sums)

    def _one_block(self, n: int, quantities: int) -> bool:
        return self.groups.kind == "tensor" and n <= GRID and quantities == self.sums.shape[0]

    def _add_block(self, offset: int, block: np.ndarray) -> None:
        """Each quantity's values, one row of `block` each, zero-padded to a power of two, for one grid block."""
        require_grid(offset)
        self.add_block_sums(self.pairwise_sums(torch.from_numpy(block)[:, :, None]).numpy().reshape(1, -1))

    def add_block_sums(self, block_sums: np.ndarray) -> None:
        """Whole-tensor sums: block_sums[b, q] (the grid blocks' sums of each quantity) added to each quantity's
        total in block order."""
        totals = self.sums.numpy()[:, 0]  # (a view of the sums: added to in place)
        for q, column in enumerate(block_sums.T.tolist()):
            for block_sum in column:
                totals[q] += block_sum

    def _add_blocks(self, sums: torch.Tensor, offset: int, values: torch.Tensor) -> None:
        """Whole grid blocks, or a last, shorter block (the end of the tensor), which counts as padded with zeros
        to the grid (summed over the next power of two instead: `padded_rows`)."""
        n = values.numel()
        kind, p = self.groups.kind, self.groups.period
        if kind == "rows":  # rows divide the grid: each row lies in one block (and the tensor ends with a row)
            first = offset // p
            sums[first:first + n // p] += self.pairwise_sums(values.view(-1, p, 1)).flatten()
            return
        width = 1 if kind == "tensor" else p  # columns: the tensor ends with a whole column period
        whole = n // GRID * GRID
        blocks = [values[:whole].view(-1, GRID // width, width)] if whole else []
        if whole < n:
            blocks.append(padded_rows(values[whole:], width))
        for block in blocks:
            if kind == "tensor":
                total = sums.numpy()  # (a view of the sums: written in place)
                for block_sum in self.pairwise_sums(block).numpy().ravel().tolist():
                    total[0] += block_sum
            else:  # column periods divide the grid: each block adds to every column, in block order
                sums.copy_(torch.cat([sums[None], self.pairwise_sums(block)]).cumsum(0)[-1])


# -- randomness ----------------------------------------------------------------------------------------------
DRAW_GRAIN = 1 << 16  # the fewest draws a thread makes
KERNEL_GRAIN = 1 << 15  # the fewest elements a thread takes in an element-wise compiled kernel


def stream_key(seed: int, name: str, stream: int) -> np.ndarray:
    """The 128 bits that name one random stream, (seed, tensor name, stream) hashed: Philox4x32's two counter
    words above the element's block and its two key words, as four uint32."""
    digest = hashlib.blake2b(f"{seed}\0{name}\0{stream}".encode(), digest_size=16).digest()
    return np.frombuffer(digest, dtype="<u4").astype(np.uint32)


_POOL: ThreadPoolExecutor | None = None


RangeWork = Callable[[int, int], None]  # work on an element range [a, z) of a chunk


def thread_parts(n: int, grain: int) -> int:
    """How many ranges `in_parallel` splits n elements into: as many as the merge's threads, each at least
    `grain` long."""
    return max(1, min(pool_threads(), MAX_THREADS, n // max(grain, 1)))


def in_parallel(n: int, work: Callable[[int, int], Any], grain: int) -> list:
    """`work(a, b)` over the ranges that split [0, n), as many as the merge's intra-op threads (torch's count)
    and each at least `grain` long, on a pool of threads: for numpy and compiled calls that release the GIL
    (sorts, random draws), whose results depend on their range alone. What the calls return, in range order."""
    global _POOL
    parts = thread_parts(n, grain)
    if parts < 2:
        return [work(0, n)]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(MAX_THREADS, thread_name_prefix="streammerge-numpy")
    step = -(-n // parts)
    return list(_POOL.map(lambda a: work(a, min(n, a + step)), range(0, n, step)))


def range_step(kernel: Callable, tensors: tuple[torch.Tensor, ...], *numbers) -> RangeWork:
    """An element-wise compiled kernel over same-length contiguous tensors, as a function of an element range
    [a, z) (for `in_parallel`, or for a merge that runs several such steps on each thread's range)."""
    arrays = [t.numpy() for t in tensors]
    return lambda a, z: kernel(*(x[a:z] for x in arrays), *numbers)


class Uniform:
    """U[0, 1) float32 numbers for any element range of a tensor, counter-based: element i gets word i % 4 of the
    Philox4x32-10 block at counter i // 4 of the stream `stream_key(seed, name, stream)`, as (word >> 8) / 2**24
    (`philox`). A number depends on its element alone, so on no chunking, nor threads."""

    def __init__(self, seed: int, name: str, stream: int):
        self.stream = stream_key(seed, name, stream)

    def fill(self, start: int, out: np.ndarray) -> np.ndarray:
        """out[i] = the number of element start + i, into a contiguous float32 array, on the calling thread (the
        merges split their work between threads, each part drawing from its first element)."""
        from streammerge.kernels import philox  # (numba: imported by the merges that draw, not by every command)
        philox.fill(out, start, self.stream)
        return out


# -- exact order statistics ----------------------------------------------------------------------------------
SAMPLE = 1 << 13  # elements of the strided sample that brackets each selected rank
UNSIGNED = {4: np.uint32, 8: np.uint64}
SIGNED = {4: np.int32, 8: np.int64}
STREAMED_SAMPLE = 1 << 16  # the same from the first chunk of a tensor streamed in chunks (`StreamedBrackets`)
# and the share of the elements either side of each rank its ranges take at least, where the room allows: wider
# than the sample's error, for the rest of a tensor that differs a little from its first chunk, but few to copy
STREAMED_SHARE = 0.01
# Standard errors of the sample's quantile either side of each rank, widest first: a narrower range is tried where
# a wider one would not fit the room (a miss costs no more than not trying: the histogram passes)
STREAMED_DEVIATIONS = (4.0, 3.0, 2.0)
BRACKET_FROM = 1 << 16  # fewer elements are partitioned whole: bracketing them first saves nothing
CALIBRATION_KEYS = 1 << 18  # magnitudes both whole-tensor selections are timed on, once per process
CALIBRATION_ROUNDS = 3  # ... each, alternately: the best of each compared
HEAVY_FROM = 1 << 15  # fewer keys are partitioned without looking for a key many of them share
HEAVY_SAMPLE = 1 << 11  # keys sampled to look for one
HEAVY_SHARE = 16  # a key held by over 1/HEAVY_SHARE of them is set aside before partitioning
COUNT_SLICE = 1 << 18  # elements compared at a time when counting those below and equal to a selected value
HELD_SLICE = 1 << 17  # elements of values held in memory observed at a time (`RankSelect.select_held`)
BINCOUNT_SLICE = 1 << 21  # torch.bincount copies its int32 input whole (4 bytes per element): bound that copy


def _bincount(digits: torch.Tensor, bins: int) -> torch.Tensor:
    """torch.bincount of a chunk, a slice at a time, so its temporary stays small whatever the chunk size."""
    counts = torch.bincount(digits[:BINCOUNT_SLICE], minlength=bins)
    for a in range(BINCOUNT_SLICE, digits.numel(), BINCOUNT_SLICE):
        counts += torch.bincount(digits[a:a + BINCOUNT_SLICE], minlength=bins)
    return counts


class RankSelect:
    """The values at given ascending ranks (0-based) among the non-negative numbers of a tensor, found in
    `passes` histogram passes over its chunks (radix selection on the IEEE bit patterns, which order like the
    numbers themselves). After the last pass, for each rank: `value`, `ties_before` (elements equal to `value`
    with a lower rank) and `count_equal`.

    When the first pass's chunk is the whole tensor (`whole`), the selection is made on it at once instead: the
    bit patterns inside sample brackets of the ranks (or all of them) are partitioned (numpy's introselect) in the
    digits buffer, and the elements below and equal to each selected pattern counted. The order statistics of
    the patterns are what the radix passes find, so the results are the same; the later passes then have nothing
    left to do (`done`). For a tensor streamed in chunks, the first pass may bracket the ranks instead
    (`bracket_streamed`). Where every rank falls among the elements equal to 0, the first histogram pass selects
    them (`done`)."""

    def __init__(self, ranks: list[int], dtype: torch.dtype):
        self.ranks = list(ranks)
        self.int_dtype = INT_VIEW[dtype]
        self.float_dtype = dtype
        self.bits = dtype.itemsize * 8
        self.passes = self.passes_for(dtype)
        self.prefix = [0] * len(ranks)
        self.remaining = list(ranks)
        self.count_equal = [0] * len(ranks)
        self.hist: list[torch.Tensor] = []  # one histogram per rank, from the first pass that needs them
        self.done = False  # every rank selected at once (from a whole-tensor chunk, or by a bracketing pass)
        self.zeros = 0  # elements equal to 0 seen by the first histogram pass (`_finish_among_zeros`)
        self._whole: tuple | None = None  # (values, digits buffer) held from observe to finish_pass(0)
        self._streamed: StreamedBrackets | None = None
        self._bracket_whole: tuple[torch.Tensor, bool] | None = None  # (`bracket_whole`)

    @staticmethod
    def passes_for(dtype: torch.dtype) -> int:
        """Histogram passes a selection over values of `dtype` takes (one per digit of the bit pattern)."""
        return dtype.itemsize * 8 // DIGIT_BITS

    def observe(self, pass_index: int, values: torch.Tensor, digits_buffer: torch.Tensor,
                whole: bool = False) -> None:
        """values: magnitudes (>= 0) of one chunk; digits_buffer: scratch of the same length and width; `whole`:
        the chunk is the whole tensor, and both stay untouched until `finish_pass(0)` (which selects on them: the
        ranks may be set in between)."""
        if self.done:
            return
        if whole and pass_index == 0:
            self._whole = (values, digits_buffer)
            return
        self._observe(pass_index, values, digits_buffer)

    def bracket_streamed(self, room: torch.Tensor, numel: int, compiled: bool = False,
                         share: float = STREAMED_SHARE) -> None:
        """For a tensor of `numel` elements streamed in chunks: make the first pass bracket the ranks and keep the
        values near them in `room` (scratch of the values' width, untouched until `finish_pass(0)`) instead of
        counting digits, so that where the ranges hold every rank they are selected at that pass's end (`done`),
        and where they do not, `finish_pass(0)` asks for the histogram passes from the first on (it returns 0;
        `StreamedBrackets`, with its compiled pass where `compiled`, and ranges of at least `share` of the elements
        either side of each rank where the room allows)."""
        self._streamed = StreamedBrackets(room.view(self.int_dtype).numpy(), numel, compiled, share)

    def _observe(self, pass_index: int, values: torch.Tensor, digits_buffer: torch.Tensor) -> None:
        if self._streamed is not None:
            self._streamed.observe(values.view(self.int_dtype).numpy(), self.ranks)
            return
        if not self.hist:
            self.hist = [torch.zeros(BINS, dtype=torch.int64) for _ in self.ranks]
        bits = values.view(self.int_dtype)
        digits = digits_buffer.view(self.int_dtype)[:values.numel()]
        shift = self.bits - DIGIT_BITS * (pass_index + 1)
        if pass_index == 0:
            torch.bitwise_right_shift(bits, shift, out=digits)
            counts = _bincount(digits, BINS)
            for hist in self.hist:
                hist += counts
            if self.passes > 1 and int(counts[0]):  # (the zeros' bucket, which subnormals share)
                self.zeros += _count_equal(bits.numpy(), 0)
            return
        for j, hist in enumerate(self.hist):
            # (bits >> shift) - (prefix << DIGIT_BITS) is the digit for the elements under the prefix, negative
            # below it and at least BINS above it: shifted by one and clamped, bin 0 and bin BINS + 1 take the
            # others, and bins 1..BINS the digits (integer arithmetic only: a masked fill is several times slower)
            torch.bitwise_right_shift(bits, shift, out=digits)
            digits.sub_((self.prefix[j] << DIGIT_BITS) - 1).clamp_(0, BINS + 1)
            hist += _bincount(digits, BINS + 2)[1:BINS + 1]

    def select_held(self, values: torch.Tensor) -> None:
        """Every rank selected by the histogram passes over `values`, the whole tensor's non-negative values held
        in memory (gathered from its chunks), a slice at a time; `values` stay untouched (a partition would reorder
        them)."""
        digits = torch.empty(min(values.numel(), HELD_SLICE), dtype=values.dtype)
        for pass_index in range(self.passes):
            for a in range(0, values.numel(), HELD_SLICE):
                part = values[a:a + HELD_SLICE]
                self._observe(pass_index, part, digits[:part.numel()])
            self.finish_pass(pass_index)
            if self.done:
                return

    def set_rank(self, j: int, rank: int) -> None:
        """Choose rank j after the first pass has been observed, before `finish_pass(0)` (that pass's histogram
        does not depend on the ranks): for ranks that depend on a count made during the same pass."""
        self.ranks[j] = self.remaining[j] = rank

    def select_whole(self, values: torch.Tensor, digits_buffer: torch.Tensor) -> None:
        """Every rank selected now from `values`, the whole tensor's magnitudes (`done` after it), for a caller
        that has set its ranks and reuses the buffers before `finish_pass(0)`. Values the histogram passes would
        refuse are observed as their first pass instead, so the passes go on (and refuse them). `digits_buffer` may
        be `values` itself, then its own scratch (the counts do not depend on the order)."""
        if not self._select_whole(values, digits_buffer):
            self._observe(0, values, digits_buffer)

    def bracket_whole(self, area: torch.Tensor, compiled: bool = False) -> None:
        """Select a tensor held whole (of at least `BRACKET_FROM` elements) by one bracketing pass over its values
        (`StreamedBrackets`, with `area` as its threads' scratch and the digits buffer as its room) rather than a
        partition of all of them; a partition where a range misses its rank. For a caller whose values are
        magnitudes (no sign bit: not looked for)."""
        self._bracket_whole = (area, compiled)

    def _select_whole(self, values: torch.Tensor, digits_buffer: torch.Tensor) -> bool:
        """Every rank selected from the whole tensor's values at once; False (nothing done) when a bit pattern is
        negative (a sign bit set: not a magnitude), which the histogram passes refuse."""
        bits = values.view(self.int_dtype).numpy()
        if self._bracket_whole is not None and bits.size >= BRACKET_FROM \
                and not np.may_share_memory(values.numpy(), digits_buffer.numpy()):
            area, compiled = self._bracket_whole
            if self._select_by_brackets(digits_buffer[:bits.size], bits.size, compiled, area,
                                        lambda brackets: brackets.observe(bits, self.ranks)):
                return True
        return self.select_bits(bits, digits_buffer.view(self.int_dtype)[:values.numel()].numpy())

    def select_deltas(self, x: torch.Tensor, base: torch.Tensor, room: torch.Tensor, compiled: bool = False,
                      area: torch.Tensor | None = None) -> bool:
        """Every rank selected now among the magnitudes |x - base| of a whole tensor (`done` after it), bracketed
        in one pass over x and base that makes them a slice at a time and keeps those near each rank in `room`
        (scratch of the values' width, as long as x), then partitioned as `select_bits` does: x and base read once
        and the magnitudes never written whole. False (nothing selected) where a range misses its rank, as
        `StreamedBrackets` may (`compiled`: its kernel; `area`: free memory for its threads' scratch, else new)."""
        return self._select_by_brackets(room, x.numel(), compiled, area,
                                        lambda brackets: brackets.observe_deltas(x.numpy(), base.numpy(), self.ranks))

    def _select_by_brackets(self, room: torch.Tensor, numel: int, compiled: bool, area: torch.Tensor | None,
                            observe: Callable[[StreamedBrackets], None]) -> bool:
        """Every rank selected by one bracketing pass (`observe`), or False (nothing selected) where it missed."""
        brackets = StreamedBrackets(room.view(self.int_dtype).numpy(), numel, compiled, share=0.0,
                                    area=None if area is None else area.numpy().view(np.uint8), sample_size=SAMPLE)
        observe(brackets)
        selected = brackets.select(self.ranks)
        if selected is None:
            return False
        self._take(selected)
        return True

    def select_bits(self, bits: np.ndarray, keys: np.ndarray) -> bool:
        """`_select_whole` on the values' bit patterns (`bits`), with `keys` as scratch as long (or `bits`)."""
        if bits.size == 0 or bits.min() < 0:
            return False
        bracket = bits.size >= BRACKET_FROM and not partition_beats_brackets()
        selected = _select_bracketed(bits, keys, self.ranks) if bracket else None
        if selected is None:
            if not np.may_share_memory(keys, bits):  # (else the same memory: partitioned in place)
                np.copyto(keys, bits)
            selected = _select_partitioned(keys, self.ranks)
        self._take(selected)
        return True

    def _take(self, selected: list[tuple[int, int, int]]) -> None:
        """Every rank selected at once: (bit pattern, equal elements before it, equal elements in all) each, what
        the histogram passes leave in `prefix`, `remaining` and `count_equal` after their last pass (`done`)."""
        for j, (key, equal_before, count_equal) in enumerate(selected):
            self.prefix[j], self.remaining[j], self.count_equal[j] = int(key), equal_before, count_equal
        self.done = True

    def finish_pass(self, pass_index: int) -> int | None:
        """The end of pass `pass_index`; 0 where the passes must start over (a streamed bracketing that missed)."""
        if self.done:
            return None
        if self._whole is not None:
            whole, self._whole = self._whole, None
            if self._select_whole(*whole):
                return None
            self._observe(pass_index, *whole)  # the histogram passes then refuse the values
        if self._streamed is not None:
            streamed, self._streamed = self._streamed, None
            selected = streamed.select(self.ranks)
            if selected is None:
                return 0
            self._take(selected)
            return None
        if pass_index == 0 and self._finish_among_zeros():
            return None
        for j, hist in enumerate(self.hist):
            cumulative = hist.cumsum(0)
            bucket = int(torch.searchsorted(cumulative, self.remaining[j], right=True))
            self.remaining[j] -= int(cumulative[bucket - 1]) if bucket else 0
            self.prefix[j] = (self.prefix[j] << DIGIT_BITS) | bucket
            if pass_index == self.passes - 1:
                self.count_equal[j] = int(hist[bucket])
            hist.zero_()

    def _finish_among_zeros(self) -> bool:
        """After the first histogram pass: where every rank lies among the elements equal to 0 (deltas a fine-tune
        left unchanged, the importances of rows of one element), each is 0 with the zeros below it, and the later
        passes have nothing to find (`done`)."""
        if any(rank >= self.zeros for rank in self.remaining):
            return False
        self._take([(0, rank, self.zeros) for rank in self.remaining])
        return True

    def value(self, j: int) -> float:
        """The selected value of rank j (its bit pattern read as a float)."""
        formats = PACK_FORMATS[self.bits]
        return struct.unpack(formats[1], struct.pack(formats[0], self.prefix[j]))[0]

    def ties_before(self, j: int) -> int:
        return self.remaining[j]


def _count_equal(values: np.ndarray, value) -> int:
    """How many of `values` equal `value`, their ranges counted on the merge's threads."""
    counts = []

    def work(a: int, z: int) -> None:
        counts.append(sum(int(np.count_nonzero(values[s:min(z, s + COUNT_SLICE)] == value))
                          for s in range(a, z, COUNT_SLICE)))  # (a comparison makes a bool temporary: bound it)

    in_parallel(values.size, work, grain=4 * COUNT_SLICE)
    return sum(counts)


def _select_partitioned(keys: np.ndarray, ranks: list[int]) -> list[tuple[int, int, int]]:
    """(key, equal ones before it, equal ones in all) at each rank of `keys`, which are rearranged in place.
    Keys shared by many are set aside first (`_select_around`); then one partition per distinct rank, each of what
    lies above the previous one (numpy's partition at several ranks at once is several times slower): keys[rank] is
    then the rank-th smallest, with nothing larger before it and nothing smaller after it, so the elements below it
    are those before it but the equal ones."""
    heavy = _heavy_keys(keys)
    if heavy:
        return _select_around(keys, ranks, heavy)
    settled = 0  # keys[:settled] are the `settled` smallest
    for rank in sorted(set(ranks)):
        keys[settled:].partition(rank - settled)
        settled = rank + 1
    selected = []
    for rank in ranks:
        key = keys[rank]
        equal_before = _count_equal(keys[:rank], key)
        selected.append((key, equal_before, equal_before + _count_equal(keys[rank:], key)))
    return selected


def _heavy_keys(keys: np.ndarray) -> list[tuple[int, int, int]]:
    """(key, keys below it, keys equal to it) for each key that over 1/HEAVY_SHARE of `keys` equal.
    numpy's partition slows in proportion to such a block (2x at a tenth of the keys, 10x at half: mostly-zero
    deltas, half-precision fine-tunes that leave many weights as they were), so those are taken out first."""
    if keys.size < HEAVY_FROM:
        return []
    values, counts = np.unique(keys[::max(keys.size // HEAVY_SAMPLE, 1) | 1], return_counts=True)
    candidates = values[counts * HEAVY_SHARE > counts.sum()]
    below, equal = [0] * candidates.size, [0] * candidates.size
    for a in range(0, keys.size if candidates.size else 0, COUNT_SLICE):
        part = keys[a:a + COUNT_SLICE]
        for k, key in enumerate(candidates):
            below[k] += int(np.count_nonzero(part < key))
            equal[k] += int(np.count_nonzero(part == key))
    return [(key, below[k], equal[k]) for k, key in enumerate(candidates) if equal[k] * HEAVY_SHARE > keys.size]


def _select_around(keys: np.ndarray, ranks: list[int], heavy: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """`_select_partitioned` where each of the `heavy` keys (key, keys below it, keys equal to it) fills a block of
    ranks: the ranks in those blocks are known; the other keys are moved, in order, to the front (written only where
    already read) and the other ranks selected among them, less the heavy keys below them."""
    written = 0
    others = np.empty(min(keys.size, COUNT_SLICE), dtype=bool)
    for a in range(0, keys.size, COUNT_SLICE):
        part = keys[a:a + COUNT_SLICE]
        other = np.not_equal(part, heavy[0][0], out=others[:part.size])
        for key, _, _ in heavy[1:]:
            other &= part != key
        kept = part.take(np.flatnonzero(other))  # (a copy, safe to write over its source; by index: see `_inside`)
        keys[written:written + kept.size] = kept
        written += kept.size
    block = [next((h for h in heavy if h[1] <= rank < h[1] + h[2]), None) for rank in ranks]
    left = [rank - sum(equal for _, below, equal in heavy if below < rank) for rank, b in zip(ranks, block) if not b]
    selected = iter(_select_partitioned(keys[:written], left))
    return [(b[0], rank - b[1], b[2]) if b else next(selected) for rank, b in zip(ranks, block)]


@functools.cache
def partition_beats_brackets() -> bool:
    """Whether partitioning a tensor's keys whole selects faster, on this machine, than bracketing the ranks first
    (`_select_bracketed`); both give the same selection, so this only picks the faster. numpy's partition is
    vectorised on CPUs it has kernels for (x86-simd-sort) and scalar elsewhere: whole, a selection at the median
    of 2^18 to 2^24 half-normal float32 magnitudes took 1.2-2.1 ns per key on an AVX-512 Xeon, against 3.5-4.5
    for the brackets; where the partition is scalar (5-7 ns per key) the brackets win. Timed once per process, on
    keys spread as a hash spreads them: the two alternately, `CALIBRATION_ROUNDS` times each, the best of each
    compared, the scratch touched before the first (a first touch of fresh memory, 3 ns per key on a VM against 0.6
    for the partition after it, or a pause of the process in a round would otherwise pick the slower). About 10 ms,
    3 MiB of temporaries."""
    mixed = np.arange(CALIBRATION_KEYS, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # (a splitmix64 hash)
    mixed ^= mixed >> np.uint64(31)
    mixed *= np.uint64(0xBF58476D1CE4E5B9)
    mixed ^= mixed >> np.uint64(29)
    bits = (mixed >> np.uint64(41)).astype(np.int32) | np.int32(0x3F800000)  # float32 patterns spread over [1, 2)
    del mixed
    scratch, ranks = bits.copy(), [CALIBRATION_KEYS // 2]

    def whole() -> None:
        np.copyto(scratch, bits)
        _select_partitioned(scratch, ranks)

    selections = (whole, lambda: _select_bracketed(bits, scratch, ranks))
    best = [math.inf, math.inf]
    for _ in range(CALIBRATION_ROUNDS):
        for k, select in enumerate(selections):
            start = time.perf_counter()
            select()
            best[k] = min(best[k], time.perf_counter() - start)
    return best[0] < best[1]


def _select_bracketed(bits: np.ndarray, keys: np.ndarray, ranks: list[int]) -> list[tuple[int, int, int]] | None:
    """`_select_partitioned` of `bits` without partitioning them whole: a strided sample brackets each rank with a
    range of values [low, high] that holds it with near certainty; one pass counts the elements below and inside
    each range (`bits` untouched), and where every rank does lie inside its range, a second moves the elements
    inside the ranges, in order, to the front of `keys` (which may be `bits`: written only where already read),
    where a partition of those few finds every rank, shifted by the elements below its range that were left out.
    The same keys and counts: every element equal to a selected key lies inside its range. None (nothing written)
    where a range misses its rank or the ranges hold too much to be worth it."""
    n = bits.size
    brackets = _rank_brackets(bits, ranks, n, SAMPLE, 0.0)
    below, inside = [0] * len(brackets), [0] * len(brackets)
    for a in range(0, n, COUNT_SLICE):
        part = bits[a:a + COUNT_SLICE]
        for k, (low, high) in enumerate(brackets):
            under = int(np.count_nonzero(part < low))
            below[k] += under
            inside[k] += int(np.count_nonzero(part <= high)) - under
    moved_ranks = _moved_ranks(below, inside, ranks)
    if sum(inside) > n // 4 or moved_ranks is None:
        return None
    lows, spans = range_bounds(brackets)
    mask, scratch = np.empty(min(n, COUNT_SLICE), dtype=np.uint8), np.empty(min(n, COUNT_SLICE), dtype=bits.dtype)
    written = 0
    for a in range(0, n, COUNT_SLICE):
        kept = _inside(bits[a:a + COUNT_SLICE], lows, spans, mask, scratch)
        keys[written:written + kept] = scratch[:kept]  # (a copy: may write over its source)
        written += kept
    return _select_partitioned(keys[:written], moved_ranks)


def _rank_brackets(bits: np.ndarray, ranks: list[int], n: int, sample_size: int, share: float,
                   deviations: float = 4.0) -> list[list]:
    """[low, high] of disjoint ranges of bit patterns, ascending, that hold the given ranks among n values
    with near certainty, from a strided sample of about `sample_size` of `bits` (which are those values, or a part
    of them): `deviations` standard errors of the sample's quantile either side of each rank, or `share` of n where
    that is wider."""
    sample = bits[::max(bits.size // sample_size, 1) | 1].copy()  # (an odd stride: rows of a power-of-two width vary)
    places = []
    for rank in sorted(set(ranks)):
        q = rank / n
        at = q * sample.size
        margin = max(deviations * math.sqrt(sample.size * q * (1 - q)) + 8, share * sample.size)
        places.append((int(at - margin), int(at + margin) + 1))  # (past either end: open on that side)
    inner = sorted({i for place in places for i in place if 0 < i < sample.size - 1})
    if inner:
        sample.partition(inner)  # (sample[i] is then the sample's i-th smallest at each of those places)
    brackets: list[list] = []
    for first, last in places:
        low = sample[first] if first > 0 else sample.dtype.type(0)
        high = sample[last] if last < sample.size - 1 else np.iinfo(sample.dtype).max
        if brackets and low <= brackets[-1][1]:
            brackets[-1][1] = max(high, brackets[-1][1])
        else:
            brackets.append([low, high])
    return brackets


def _moved_ranks(below: list[int], inside: list[int], ranks: list[int]) -> list[int] | None:
    """Each rank's place among the elements inside the ranges (moved to the front, in order), given the elements
    below and inside each range: the rank less the elements below its range that were not moved. None where a
    rank lies inside none of them."""
    moved = []
    for rank in ranks:
        k = next((k for k in range(len(below)) if below[k] <= rank < below[k] + inside[k]), None)
        if k is None:
            return None
        moved.append(rank - (below[k] - sum(inside[:k])))
    return moved


def range_bounds(brackets: list[list]) -> tuple[np.ndarray, np.ndarray]:
    """Ranges [low, high] as `bracket_slice` takes them: their low ends (int64) and widths (uint64)."""
    return (np.array([low for low, _ in brackets], dtype=np.int64),
            np.array([int(high) - int(low) for low, high in brackets], dtype=np.uint64))


def bracket_slice(part: np.ndarray, lows: np.ndarray, spans: np.ndarray, below: np.ndarray, mask: np.ndarray,
                  out: np.ndarray) -> int:
    """below[k] += the elements of `part` (non-negative bit patterns) under lows[k]; out[:kept] = those inside
    any range [lows[k], lows[k] + spans[k]], in order; returns kept. mask: uint8 scratch and out as long as part
    (`kernels.brackets.bracket_slice` does the same in one compiled pass, for the merges that load numba)."""
    for k, low in enumerate(lows):
        below[k] += int(np.count_nonzero(part < low))
    return _inside(part, lows, spans, mask, out)


def _inside(part: np.ndarray, lows: np.ndarray, spans: np.ndarray, mask: np.ndarray, out: np.ndarray) -> int:
    """`bracket_slice` without the counts. low <= x <= high as one unsigned comparison of x - low (x and low
    non-negative: no overflow), which numpy does in a third of the time of two comparisons and their conjunction;
    the kept elements taken by their indices (a boolean subscript branches on each element: 0.7 ns an element
    where 4% are kept, 3-5 ns where a fifth to a half are, against 0.5-0.7)."""
    inside_any = mask[:part.size].view(bool)
    difference = out[:part.size]
    unsigned = difference.view(UNSIGNED[difference.dtype.itemsize])
    for k, (low, span) in enumerate(zip(lows, spans)):
        np.subtract(part, part.dtype.type(low), out=difference)
        if k:
            inside_any |= unsigned <= unsigned.dtype.type(span)
        else:
            np.less_equal(unsigned, unsigned.dtype.type(span), out=inside_any)
    kept = np.flatnonzero(inside_any)
    np.take(part, kept, out=out[:kept.size])
    return kept.size


class StreamedBrackets:
    """The ranks of a `RankSelect` over a tensor streamed in chunks, found in one pass where they can be: ranges of
    values around them are estimated from the first chunk (`_rank_brackets`, as wide as `room` allows), then every
    chunk adds its elements below each range to a count and copies those inside into `room`. At the pass's end,
    where every rank lies inside a range, a partition of what was kept selects them (as `_select_bracketed` does
    for a tensor held whole). Where a rank lies inside none (the first chunk was not like the rest) or `room`
    filled up, `select` gives None and the histogram passes start over. `compiled`: each slice's pass is
    `kernels.brackets.bracket_slice` (for a merge that loads numba; else numpy's `bracket_slice`, the same counts
    and elements). A tensor held whole is bracketed the same way in one call (`RankSelect.select_deltas`,
    `RankSelect.bracket_whole`): the ranges from a strided sample of about `sample_size` of all its values, the
    threads' scratch carved from `area` (free memory, bytes) where it holds it."""

    def __init__(self, room: np.ndarray, numel: int, compiled: bool = False, share: float = STREAMED_SHARE,
                 area: np.ndarray | None = None, sample_size: int = STREAMED_SAMPLE):
        self.room, self.numel, self.share, self.area, self.sample_size = room, numel, share, area, sample_size
        if compiled:
            from streammerge.kernels import brackets  # (numba: loaded by the methods that bracket with it)
            self.bracket_slice = brackets.bracket_slice
        else:
            self.bracket_slice = bracket_slice
        self.brackets: list[list] | None = None
        self.bounds: tuple[np.ndarray, np.ndarray] | None = None  # (the ranges as `bracket_slice` takes them)
        self.below: list[int] = []
        self.written = 0
        self.full = False
        self.scratch: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (`_scratch`)

    def observe(self, bits: np.ndarray, ranks: list[int]) -> None:
        """Count the chunk's elements below each range and keep those inside (`_pass`)."""
        if self.full or (self.brackets is None and not self._start(bits, ranks)):
            return
        lows, spans = self.bounds
        self._pass(bits.size, lambda p, a, z, below, mask, inside:
                   self.bracket_slice(bits[a:z], lows, spans, below, mask, inside))

    def observe_deltas(self, x: np.ndarray, base: np.ndarray, ranks: list[int]) -> None:
        """`observe` of the magnitudes |x - base|, each slice's made in its thread's scratch (nothing as long as
        x held beside it, and x and base read once); the ranges from a strided sample of all of them."""
        stride = max(x.size // self.sample_size, 1) | 1
        sample = np.abs(x[::stride] - base[::stride])
        if self.full or (self.brackets is None and not self._start(sample.view(SIGNED[x.dtype.itemsize]), ranks)):
            return
        lows, spans = self.bounds

        def slice_pass(p: int, a: int, z: int, below: np.ndarray, mask: np.ndarray, inside: np.ndarray) -> int:
            magnitudes = self.scratch[p][2][:z - a].view(x.dtype)
            values = np.abs(np.subtract(x[a:z], base[a:z], out=magnitudes), out=magnitudes)
            return self.bracket_slice(values.view(inside.dtype), lows, spans, below, mask, inside)

        self._pass(x.size, slice_pass)

    def _pass(self, n: int, slice_pass: Callable) -> None:
        """A chunk of n elements' counts below each range and those kept inside, its element ranges split between
        the merge's threads: each counts its own and copies what it keeps into its own share of the room left, a
        slice at a time (`slice_pass(p, start, stop, below, mask, inside)`: part p's slice [start, stop) counted
        into `below`, what it keeps written to `inside`, how many returned), so nothing larger than a slice is held
        beside the room; the shares are then closed up, in the chunk's order. A share that fills up fills the room
        (the histogram passes then select)."""
        parts = thread_parts(n, COUNT_SLICE)
        step, share = -(-n // parts), (self.room.size - self.written) // parts
        if len(self.scratch) < parts:
            self.scratch = self._scratch(parts, min(COUNT_SLICE, step) if self.area is not None else COUNT_SLICE)
        found: dict[int, tuple[list[int], int, int] | None] = {}

        def work(first: int, last: int) -> None:
            for p in range(first, last):
                found[p] = None  # (stays None where its share fills up)
                below, at, kept = np.zeros(len(self.brackets), dtype=np.int64), self.written + p * share, 0
                inside, mask, _ = self.scratch[p]
                for start in range(p * step, min(n, (p + 1) * step), COUNT_SLICE):
                    count = slice_pass(p, start, min(n, (p + 1) * step, start + COUNT_SLICE), below, mask, inside)
                    if kept + count > share:
                        return
                    self.room[at + kept:at + kept + count] = inside[:count]
                    kept += count
                found[p] = below.tolist(), at, kept

        in_parallel(parts, work, grain=1)
        for p in sorted(found):
            if found[p] is None:
                self.full = True
                return
            below, at, kept = found[p]
            self.below = [total + more for total, more in zip(self.below, below)]
            if at == self.written:  # (the first share: in place)
                self.written += kept
                continue
            for start in range(0, kept, COUNT_SLICE):  # (front to back; numpy copies an overlapping slice whole)
                length = min(COUNT_SLICE, kept - start)
                self.room[self.written:self.written + length] = self.room[at + start:at + start + length]
                self.written += length

    def _scratch(self, parts: int, length: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Each part's scratch for a slice of `length` elements, made once per tensor: what it keeps, its mask, and
        the values a pass makes (`observe_deltas`); carved from `area` (bytes, for a single pass over a whole tensor)
        where it holds them all, else new."""
        width = self.room.itemsize
        if self.area is None or self.area.size < parts * length * (2 * width + 1):
            return [(np.empty(length, dtype=self.room.dtype), np.empty(length, dtype=np.uint8),
                     np.empty(length, dtype=self.room.dtype)) for _ in range(parts)]
        size = parts * length * width
        kept, made, masks = self.area[:size], self.area[size:2 * size], self.area[2 * size:]  # (masks last: aligned)
        return [(kept[p * length * width:(p + 1) * length * width].view(self.room.dtype),
                 masks[p * length:(p + 1) * length],
                 made[p * length * width:(p + 1) * length * width].view(self.room.dtype)) for p in range(parts)]

    def _start(self, bits: np.ndarray, ranks: list[int]) -> bool:
        """The ranges, from `bits` (the first chunk, or a sample of the whole tensor), as wide as
        `STREAMED_DEVIATIONS` allow in turn while what they would hold does not fit the room; False (and `full`)
        where even the narrowest would not."""
        share = self.room.size / (4 * max(len(ranks), 1) * max(self.numel, 1))  # (at most half the room, expected)
        sample = bits[:COUNT_SLICE]
        mask, kept = np.empty(sample.size, dtype=np.uint8), np.empty_like(sample)  # (the sample's count's scratch)
        for deviations in STREAMED_DEVIATIONS:
            self.brackets = _rank_brackets(bits, ranks, self.numel, self.sample_size, min(share, self.share),
                                           deviations)
            self.bounds = lows, spans = range_bounds(self.brackets)
            inside = self.bracket_slice(sample, lows, spans, np.zeros(lows.size, dtype=np.int64), mask, kept)
            self.full = inside / sample.size * self.numel > self.room.size * 3 // 4  # (expected to fill it)
            if not self.full:
                break
        self.below = [0] * len(self.brackets)
        return not self.full

    def select(self, ranks: list[int]) -> list[tuple[int, int, int]] | None:
        """The ranks (those the ranges were made for, or ranks set since, as `sce` sets its rank once it has
        counted a whole pass) selected among the elements kept, or None where one lies inside no range."""
        self.scratch = []
        if self.full or self.brackets is None:
            return None
        moved = self.room[:self.written]
        inside = [int(np.count_nonzero((moved >= low) & (moved <= high))) for low, high in self.brackets]
        moved_ranks = _moved_ranks(self.below, inside, ranks)
        return None if moved_ranks is None else _select_partitioned(moved, moved_ranks)


class TieGate:
    """Among the elements equal to `value` (`total` of them in the tensor, where known), keeps those whose position
    among them (in tensor order) is in [first, stop). The merge pass sees chunks in order, so a running count of
    such elements is all it needs."""

    def __init__(self, value: float, first: int, stop: int, total: int | None = None):
        self.value, self.first, self.stop, self.total = value, first, stop, total
        self.seen = 0

    def apply(self, magnitudes: torch.Tensor, keep: torch.Tensor, equal: torch.Tensor, counts: torch.Tensor) -> None:
        """keep |= the chunk's elements admitted; equal (bool) and counts (int) are chunk-sized scratch."""
        n = int(np.count_nonzero(compare(np.equal, magnitudes, self.value, equal).numpy()))
        if not n:
            return
        first, stop = max(self.first - self.seen, 0), min(self.stop - self.seen, n)
        self.seen += n
        if first >= stop:
            return
        if first == 0 and stop == n:
            keep.logical_or_(equal)
            return
        # The admitted elements are the equal ones from the (first + 1)-th to the stop-th: find both places by the
        # running count of equal elements (numpy: see masks.compare).
        equal_array, kept, running = equal.numpy(), keep.numpy(), counts.numpy()
        np.copyto(running, equal_array)
        np.cumsum(running, out=running)  # (in its own dtype: with another, numpy converts a chunk-sized copy first)
        # (each count in the counts' dtype: given a Python int, numpy converts a copy of the counts to int64)
        low, high = (int(np.searchsorted(running, running.dtype.type(count), side="right")) for count in (first, stop))
        np.logical_or(kept[low:high], equal_array[low:high], out=kept[low:high])

    def span(self, x: np.ndarray, base: np.ndarray) -> tuple[int, int]:
        """For a compiled merge step over a chunk of task vector x - base: [start, stop), the indices within which
        the elements whose magnitude equals `value` are the ones admitted (so that a step over any range of the
        chunk can test each element on its own), `seen` advanced past the chunk. The equal elements are counted
        range by range on the merge's threads, then looked for only in the ranges holding the admitted ones' ends."""
        if self.seen >= self.stop:  # (past the last admitted: no need to count on)
            return 0, 0
        if self.seen >= self.first and self.total is not None and self.stop >= self.total:  # (every one left)
            return 0, x.size
        from streammerge.kernels import magnitude  # (numba: imported by the merges that use it)
        value = x.dtype.type(self.value)
        counts: dict[tuple[int, int], int] = {}
        in_parallel(x.size, lambda a, z: counts.__setitem__((a, z), magnitude.count_equal(x[a:z], base[a:z], value)),
                    grain=KERNEL_GRAIN)
        total = sum(counts.values())
        first, stop = self.first - self.seen, self.stop - self.seen  # (the admitted ones, counted in this chunk)
        self.seen += total

        def place(k: int) -> int:  # the index of the k-th equal element: 0 before the first, x.size after the last
            if k <= 0 or k >= total:
                return 0 if k <= 0 else x.size
            for (a, z), count in sorted(counts.items()):
                if k < count:
                    return a + magnitude.index_of_equal(x[a:z], base[a:z], value, k)
                k -= count
            raise AssertionError("unreachable: k < total")

        return place(first), place(stop)
