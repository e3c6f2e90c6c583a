"""arcee_fusion: take the model's value only where its change from the base is unusually important.

mergekit 0.1.5's definition, x the model, b the base, rows along the last dimension (a 1-D tensor is one row):
- importance = |x - b| * KL_row, KL_row = sum_j p_j log(p_j / q_j) with p = softmax(x) + 1e-8 and
  q = softmax(b) + 1e-8 over the row;
- threshold = Q(0.5) + 1.5 * (Q(0.75) - Q(0.25)), Q(q) the element of rank int(q * (n - 1)) of the sorted
  importances;
- result = b + (x - b) * [importance >= threshold].

Streaming: pass 1 gathers each row's log-sum-exp of x and of b (max and rescaled sum, combined per grid block in
float64), pass 2 each row's KL (float64 sums per grid block), passes 3-4 (float32; 6 for float64) the three
quantiles by exact radix selection over the importances, then the merge pass. When a few grid blocks hold whole
rows (`row_block`: rows of 1024, 2048, 4096 in one block, of 3072 or 1536 in three), the engine streams the tensor
in chunks of such blocks, so no row straddles a chunk and a chunk's rows get their softmaxes, KL and importances
from that chunk alone: the first pass does all three, each row's in one compiled pass over it (`kernels.fusion`),
and the first selection pass. When the importances of the whole tensor fit the method's buffers
(`ChunkContext.arena`), the first selection pass gathers them there and selects the quantiles at its end, as for a
tensor held whole; when they do not, it brackets the quartiles from the first chunk's importances
(`RankSelect.bracket_streamed`, `BRACKET_SHARE`) and selects them at its end where each lies inside its range.
Either way the other selection passes are skipped: 2 reads in all for rows in whole chunks (4 where a range
missed, 5 before row blocks and bracketing). Rows of one element have importances all 0, whose quartiles the first
histogram pass finds among the zeros: 2 reads too (`RankSelect`).
mergekit sorts a random sample of 10^6 importances (with replacement) instead of all of them for tensors larger
than that, so its thresholds vary from run to run there; streammerge uses the exact quantiles (see the README for
the difference).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from streammerge.memory import MIN_CHUNK_ELEMENTS
from streammerge.methods.method import GRID, ChunkContext, Method, kernel_loader, per_segment
from streammerge.methods.streaming import (Groups, GroupSums, RankSelect, grid_blocks, group_slices,
                                          group_stats_bytes, in_parallel)

SOFTMAX_EPS = 1e-8
QUANTILES = (1, 4), (2, 4), (3, 4)  # 0.25, 0.5, 0.75 as fractions
IQR_FACTOR = 1.5
MIN_ROW = 1024  # elements: shorter rows that do not divide the grid are summed per grid block (`row_block`)
SHORT_ROW = 32  # elements: rows up to this long are reduced a column at a time (`_row_reduce`)
BUFFERS = 5  # a chunk's importances and the selection's scratch; or a streamed tensor's importances, gathered
# The share of a streamed tensor's importances either side of each quartile that the bracketing pass keeps, where
# its room allows (`RankSelect.bracket_streamed`): the importances of a row share its KL, so the first chunk is a
# sample of a few hundred rows rather than of independent values, and its quartiles stray further than the
# ranges of the selections of magnitudes allow for
BRACKET_SHARE = 0.05


class RowLogSumExp:
    """log sum_j exp(v_j) per group of a tensor, accumulated per grid block in index order (a running max and a
    sum rescaled to it, in float64), so the result does not depend on the chunking."""

    def __init__(self, groups: Groups):
        self.groups = groups
        self.max = torch.full((groups.count,), -torch.inf, dtype=torch.float64)
        self.sum = torch.zeros(groups.count, dtype=torch.float64)

    def _combine(self, rows: slice, block_max: torch.Tensor, block_sum: torch.Tensor) -> None:
        new_max = torch.maximum(self.max[rows], block_max)
        self.sum[rows] = (self.sum[rows] * torch.exp(self.max[rows] - new_max).nan_to_num_(0.0)
                          + block_sum * torch.exp(block_max - new_max).nan_to_num_(0.0))
        self.max[rows] = new_max

    def add(self, offset: int, values: torch.Tensor) -> None:
        """Add each grid block's piece of each row of the chunk `values` (from `offset`), blocks in order."""
        p = self.groups.period
        for a, b in grid_blocks(offset, values.numel()):
            for start, stop, full in self.groups.pieces(offset + a, offset + b):
                part = values[start - offset:stop - offset].numpy().astype(np.float64)
                whole_rows = full and self.groups.kind != "tensor"  # (first seen here: nothing to combine with)
                if whole_rows:
                    rows, part = slice(start // p, stop // p), part.reshape(-1, p)
                else:
                    row = start // p if self.groups.kind != "tensor" else 0
                    rows, part = slice(row, row + 1), part.reshape(1, -1)
                with np.errstate(all="ignore"):  # (NaN and infinite inputs: IEEE results, as torch gives them)
                    block_max, block_sum = _exp_sums(part, np.empty_like(part))
                if whole_rows:
                    self.max.numpy()[rows], self.sum.numpy()[rows] = block_max, block_sum
                else:
                    self._combine(rows, torch.from_numpy(block_max), torch.from_numpy(block_sum))

    def finish(self, start: int = 0, stop: int | None = None) -> None:
        """Rows [start, stop) are complete: their log-sum-exp, max + log(sum), is made in place of their max (`max`
        is then the value), a slice of rows at a time (no temporary as long as all the rows)."""
        maxima, sums = self.max.numpy(), self.sum.numpy()
        for rows in group_slices(start, self.groups.count if stop is None else stop):
            maxima[rows] += np.log(sums[rows])


def _exp_sums(part: np.ndarray, scratch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's max and sum of exp(v - max) (part: float64 [rows, elements], read only; scratch as large). In
    numpy, whose float64 exp and log take half of torch's time here; the streamed rows make their exps and logs
    here or in `_add_kl_terms` and `RowLogSumExp.finish`, so in-memory and streamed give the same bits."""
    block_max = _row_reduce(np.maximum, part)
    shifted = np.subtract(part, block_max[:, None], out=scratch)
    return block_max, _row_reduce(np.add, np.exp(shifted, out=shifted))


def _row_reduce(ufunc: np.ufunc, part: np.ndarray) -> np.ndarray:
    """ufunc.reduce over each row of `part` [rows, elements], in element order. Short rows (a convolution's kernel
    of 3 to 11) are reduced a column at a time: numpy's reduction along a short axis costs 10-30 times as much
    (a [5957, 11] float64 block: 300 us for its maxima, 57 us by columns)."""
    if part.shape[1] > SHORT_ROW:
        return ufunc.reduce(part, axis=1)
    reduced = part[:, 0].copy()
    for column in range(1, part.shape[1]):
        ufunc(reduced, part[:, column], out=reduced)
    return reduced


def row_block(shape: tuple) -> int | None:
    """The fewest elements that are both whole grid blocks and whole rows (the last dimension), when that is at
    most the smallest chunk: chunks made of such blocks hold whole rows at every budget. None for other shapes
    (rows of 1026 elements take 513 grid blocks, rows of 7 take 7), for 1-D tensors (one row), and for short rows
    that do not divide the grid (rows of 3 or 96), which the per-block sums take faster (the compiled pass costs
    about 200 ns a row)."""
    if len(shape) < 2 or math.prod(shape) == 0:
        return None
    block = math.lcm(GRID, shape[-1])
    return block if block == GRID or (MIN_ROW <= shape[-1] and block <= MIN_CHUNK_ELEMENTS) else None


def rows_stay_in_chunks(shape: tuple) -> bool:
    """Rows that fill whole `row_block`s never straddle a chunk (the engine's chunks are multiples of it)."""
    return row_block(shape) is not None


def _clamp_kl(stats: "FusionStats", start: int, stop: int) -> None:
    """stats.kl (accumulation dtype) of rows [start, stop) from their KL sums. KL between equal-mass vectors is >= 0;
    a rounding-level negative value is taken as 0, which keeps the importances non-negative (as the radix selection
    needs)."""
    kl = stats.kl_sums.sums[0]
    for rows in group_slices(start, stop):
        stats.kl[rows] = torch.where(kl[rows] > 0, kl[rows], 0.0)


def quantile_ranks(numel: int) -> list[int]:
    return [(numel - 1) * num // den for num, den in QUANTILES]


def one_element_rows(shape: tuple) -> bool:
    """Rows of one element (a convolution's [out, in, 1] kernel): the softmax of one value is 1, whatever the
    value, so such a row's KL is 0 (for an infinite or NaN value the KL is NaN, which `_clamp_kl` takes as 0
    too). Their importances are then |x - b| * 0 with no per-row statistics: for a [3072, 1024, 1] weight those
    would hold 44 bytes per element (3 million rows), beyond the chunk buffers."""
    return len(shape) >= 2 and shape[-1] == 1


class FusionStats:
    def __init__(self, numel: int, n_models: int):
        self.numel = numel
        self.groups: Groups | None = None

    def setup(self, ctx: ChunkContext) -> None:
        self.groups = Groups("rows", ctx.shape)
        self.select = RankSelect(quantile_ranks(self.numel), ctx.out.dtype)
        self.threshold = None
        self.fused = rows_stay_in_chunks(ctx.shape)  # the first pass also gives the rows' KL and importances
        self.kl: torch.Tensor | None = None  # None: every row's KL is 0 (`one_element_rows`)
        # where the first selection pass gathers every importance of a streamed tensor, when they fit
        self.gathered = None
        if 0 < self.numel <= ctx.gather_room():
            self.gathered = ctx.arena[:self.numel]
        elif ctx.arena is not None and not ctx.gather_room() and not one_element_rows(ctx.shape):
            # held whole: its importances in the first buffer, the second the room of a bracketing pass
            self.select.bracket_whole(ctx.buffers_from(2), compiled=True)
        elif ctx.gather_room() and not one_element_rows(ctx.shape):
            # the first selection pass brackets the quartiles: a chunk's importances lie in the first buffer, the
            # values near the quartiles are kept in the others (all importances are 0 for one-element rows: no
            # range around a quartile would be narrower than the tensor; the first histogram pass finds them)
            self.select.bracket_streamed(ctx.buffers_from(1), self.numel, compiled=True,
                                         share=BRACKET_SHARE)
        if not one_element_rows(ctx.shape):
            if not self.fused:
                self.lse = [RowLogSumExp(self.groups), RowLogSumExp(self.groups)]  # model, base
            self.kl_sums = GroupSums(self.groups, 1)
            self.kl = torch.zeros(self.groups.count, dtype=ctx.out.dtype)

    def select_pass(self, pass_index: int) -> int | None:
        """The radix-selection pass that statistics pass `pass_index` is, or None (log-sum-exp or KL only)."""
        first = 0 if self.fused else 2
        return pass_index - first if pass_index >= first else None


def _kl_terms(stats: FusionStats, offset: int, x: torch.Tensor, base: torch.Tensor) -> None:
    """Add sum_j p_j log(p_j / q_j) of this chunk's elements to their rows' sums (float64, per grid block)."""
    log_z = [lse.max for lse in stats.lse]  # (finished: the rows' log-sum-exp)
    for a, b in grid_blocks(offset, x.numel()):
        expanded = torch.empty(b - a, dtype=torch.float64)
        # copies (float64 chunks are the inputs themselves, which the later passes and the merge read again)
        p = x[a:b].to(torch.float64, copy=True).sub_(stats.groups.expand(log_z[0], offset + a, expanded))
        q = base[a:b].to(torch.float64, copy=True).sub_(stats.groups.expand(log_z[1], offset + a, expanded))
        with np.errstate(all="ignore"):
            _add_kl_terms(stats, offset + a, p.numpy(), q.numpy())


def _add_kl_terms(stats: FusionStats, offset: int, p: np.ndarray, q: np.ndarray) -> None:
    """Add p log(p / q) to the rows' KL sums, p and q the elements of one grid block (from `offset`) less their
    rows' log-sum-exps (float64, contiguous; both overwritten): p = exp(p) + 1e-8, the same for q."""
    p = np.exp(p, out=p)
    p += SOFTMAX_EPS
    q = np.exp(q, out=q)
    q += SOFTMAX_EPS
    log_ratio = np.log(np.divide(p, q, out=q), out=q)
    terms = np.multiply(p, log_ratio, out=p).reshape(-1)
    groups = stats.groups
    if groups.kind != "rows" or groups.period > SHORT_ROW:
        stats.kl_sums.add(0, offset, torch.from_numpy(terms))
        return
    sums, period = stats.kl_sums.sums[0].numpy(), groups.period
    for start, stop, full in groups.pieces(offset, offset + terms.size):
        part = terms[start - offset:stop - offset].reshape(-1 if full else 1, period if full else -1)
        sums[start // period:-(-stop // period)] += _row_reduce(np.add, part)


def _whole_rows_first_pass(stats: FusionStats, offset: int, x: torch.Tensor, base: torch.Tensor) -> None:
    """Rows that fill whole `row_block`s (`rows_stay_in_chunks`): the chunk starts on a row, so each row's
    softmaxes and KL sum come from its own values in one compiled pass (`kernels.fusion.row_kl`), whatever the
    chunking. The row blocks are split between the merge's threads."""
    from streammerge.kernels.fusion import row_kl

    p, n = stats.groups.period, x.numel()
    block = math.lcm(GRID, p)  # (`row_block`)
    x_values, base_values, kl = x.numpy(), base.numpy(), stats.kl_sums.sums[0].numpy()
    first_row = offset // p

    def blocks(first: int, last: int) -> None:
        a, b = first * block, min(n, last * block)
        row_kl(x_values[a:b], base_values[a:b], p, SOFTMAX_EPS, kl[first_row + a // p:first_row + b // p])

    in_parallel(-(-n // block), blocks, grain=1)


def _by_rows(kernel, stats: FusionStats, ctx: ChunkContext, out: torch.Tensor, *numbers) -> torch.Tensor:
    """A `kernels.fusion` pass over the chunk's elements into `out`, each with its row's KL, split between the
    merge's threads."""
    x, base, kl, values = ctx.inputs[0].numpy(), ctx.base.numpy(), stats.kl.numpy(), out.numpy()
    p, offset = stats.groups.period, ctx.offset
    in_parallel(out.numel(), lambda a, z: kernel(x[a:z], base[a:z], kl, p, offset + a, *numbers, values[a:z]),
                grain=GRID)
    return out


def _importance(stats: FusionStats, ctx: ChunkContext, out: torch.Tensor) -> torch.Tensor:
    """|x - b| * KL of the element's row, in the accumulation dtype (as mergekit multiplies them). The absolute
    value is taken after the product, which gives the same bits (the KL is not negative) and turns the NaN that
    an Inf input makes (-NaN on x86) into one the selection ranks, above +Inf."""
    if stats.kl is None:  # (x * 0.0 has the bits of a product with a tensor of +0.0)
        return torch.sub(ctx.inputs[0], ctx.base, out=out).mul_(0.0).abs_()
    from streammerge.kernels.fusion import importance

    return _by_rows(importance, stats, ctx, out)


def fusion_observe(stats: FusionStats, pass_index: int, ctx: ChunkContext) -> None:
    if stats.groups is None:
        stats.setup(ctx)
    x, base = ctx.inputs[0], ctx.base
    if stats.kl is not None:
        if stats.fused and pass_index == 0:  # this chunk's rows are whole: their KL now
            _whole_rows_first_pass(stats, ctx.offset, x, base)
            p = stats.groups.period
            _clamp_kl(stats, ctx.offset // p, (ctx.offset + x.numel()) // p)
        elif pass_index == 0:
            stats.lse[0].add(ctx.offset, x)
            stats.lse[1].add(ctx.offset, base)
        elif pass_index == 1 and not stats.fused:
            _kl_terms(stats, ctx.offset, x, base)
    select_pass = stats.select_pass(pass_index)
    if select_pass is not None and not stats.select.done:
        n = ctx.out.numel()
        if stats.gathered is not None:  # (selected at the pass's end)
            _importance(stats, ctx, stats.gathered[ctx.offset:ctx.offset + n])
            return
        importance = _importance(stats, ctx, ctx.buffers[0][:n])
        stats.select.observe(select_pass, importance, ctx.buffers[1][:n], whole=n == ctx.numel)


def fusion_finish(stats: FusionStats, pass_index: int) -> int | None:
    if stats.kl is not None and not stats.fused:
        if pass_index == 0:
            for lse in stats.lse:
                lse.finish()
        elif pass_index == 1:
            _clamp_kl(stats, 0, stats.groups.count)
    select_pass = stats.select_pass(pass_index)
    if select_pass is None:
        return None
    if stats.gathered is not None:
        stats.select.select_whole(stats.gathered, stats.gathered)  # (its own scratch: made again to merge)
        stats.gathered = None
    if stats.select.finish_pass(select_pass) == 0:  # a bracketing pass that missed: the histogram passes
        return pass_index - select_pass
    if not stats.select.done and select_pass < stats.select.passes - 1:
        return None
    q1, median, q3 = (torch.tensor(stats.select.value(j), dtype=stats.select.float_dtype) for j in range(3))
    stats.threshold = float(median + IQR_FACTOR * (q3 - q1))
    return pass_index + stats.select.passes - select_pass  # on to the merge (selected at once: the rest skipped)


def fusion_stats_bytes(params: dict, model_params: list[dict], dtype: torch.dtype, numel: int, shape: tuple) -> int:
    """Per row: two log-sum-exps (a max and a sum each) and the KL sum in float64, the KL in `dtype`."""
    if one_element_rows(shape):
        return 0
    return group_stats_bytes(Groups("rows", shape), 5 * 8 + dtype.itemsize)


def fusion_passes(params: dict, model_params: list[dict], dtype: torch.dtype, numel: int, shape: tuple) -> int:
    return (0 if rows_stay_in_chunks(shape) else 2) + RankSelect.passes_for(dtype)


def fusion_streamed_reads(params: dict, model_params: list[dict], dtype: torch.dtype, numel: int, shape: tuple,
                          chunk: int) -> int:
    """The passes and the merge, with one selection pass, as they usually go: importances gathered in the buffers
    (`FusionStats.gathered`) or bracketed are selected at its end, and those of rows of one element, all 0, by the
    first histogram pass (`RankSelect`); a range that misses its quartile costs the radix passes after it."""
    return fusion_passes(params, model_params, dtype, numel, shape) - RankSelect.passes_for(dtype) + 2


def arcee_fusion(ctx: ChunkContext, stats: FusionStats) -> torch.Tensor:
    if stats.kl is None:
        n = ctx.out.numel()
        importance = _importance(stats, ctx, ctx.buffers[0][:n])
        # kept: 1 where the importance reaches the threshold, else 0, compared straight into a float buffer
        keep_as_number = torch.ge(importance, stats.threshold, out=importance)
        delta = torch.sub(ctx.inputs[0], ctx.base, out=ctx.buffers[1][:n])
        return torch.mul(delta, keep_as_number, out=ctx.out).add_(ctx.base)
    from streammerge.kernels.fusion import fuse

    return _by_rows(fuse, stats, ctx, ctx.out, ctx.out.numpy().dtype.type(stats.threshold))


ARCEE_FUSION = Method(
    name="arcee_fusion",
    help="Arcee Fusion: take the model's values where their distance to the base times the row's softmax KL "
         "divergence is an upper outlier (above median + 1.5 IQR)",
    merge=per_segment(arcee_fusion), segmented=True,
    needs_base=True, stat_passes=fusion_passes, init_stats=FusionStats, observe=fusion_observe,
    finish_pass=fusion_finish, streamed_reads=fusion_streamed_reads, buffers=BUFFERS, stats_bytes=fusion_stats_bytes,
    chunk_quantum=row_block, own_threads=True,
    min_models=1, max_models=1, load=kernel_loader("fusion", "brackets"),
)

METHODS = (ARCEE_FUSION,)
