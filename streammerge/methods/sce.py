"""sce (Select, Calculate, Erase; arXiv 2408.07990): merge task vectors weighted by their energy, with a TIES-like
sign election.

mergekit 0.1.5's definition, delta_i = model_i - base:
- select: with `select_topk` < 1, keep only the entries where the models disagree most: the
  k = int(select_topk * (number of entries of nonzero variance)) largest variances across the models (population
  variance of the delta_i per entry), in every delta_i;
- calculate: each model's weight is the mean square of its (selected) delta over the whole tensor, divided by
  the sum of them (equal weights when that sum is below 1e-6);
- erase: per entry the elected sign is that of sum_i delta_i (zero counts as +); only deltas of that sign count;
- result = base + sum_i w_i delta_i [agrees] / max(1e-6, sum_i w_i [agrees]).

Streaming: the k-th largest variance is found by exact radix selection (2 histogram passes for float32, 4 for
float64; the count of nonzero variances comes with the first), equal variances at the threshold are ranked by
position (mergekit's topk picks among them arbitrarily); then one pass sums each model's squares (float64, per
grid block); then the merge pass. Without selection only the squares pass is needed. A tensor that fits in
one chunk is selected on that chunk at once (`RankSelect`'s whole-tensor selection: the same order statistics).
A larger tensor whose variance fits the method's buffers (`ChunkContext.arena`) has it gathered there by the
first pass and selected in memory by the same histogram passes, then its kept entries stored as bits in the
first buffer (the variance's, unused once they are stored): the variance is computed once instead of once per
pass, and the squares and merge passes read the bits.
"""

from __future__ import annotations

import numpy as np
import torch

from streammerge.methods.masks import INT_VIEW, compare, keep_only
from streammerge.methods.method import GRID, ChunkContext, Method, Param, per_segment
from streammerge.methods.streaming import Groups, GroupSums, RankSelect, bool_views
from streammerge.methods.sparsifiers import Bounds, bounds_from
from streammerge.methods.task_vectors import INT8_MASK

MIN_WEIGHT_SUM = 1e-6  # below this sum of mean squares the models get equal weights (mergekit)
MIN_DIVISOR = 1e-6
VARIANCE_BLOCK = GRID  # elements per block of the per-entry variance (float64 temporaries, n_models + 1 of them)
BUFFERS = 5
KEEP_SLICE = GRID  # elements whose kept bits are made or read back at a time (bool and int temporaries)


def _select_all(params: dict) -> bool:
    return params["select_topk"] >= 1


def _select_none(params: dict) -> bool:
    return params["select_topk"] <= 0


def sce_passes(params: dict, model_params: list[dict], dtype: torch.dtype, numel: int, shape: tuple) -> int:
    if _select_none(params):
        return 0  # nothing selected: the result is the base
    return 1 + (0 if _select_all(params) else RankSelect.passes_for(dtype))


def _gathers(numel: int, arena_elements: int) -> bool:
    """Whether a streamed tensor's variance fits the method's buffers (its kept bits then fit the first one)."""
    return 0 < numel <= arena_elements


def sce_streamed_reads(params: dict, model_params: list[dict], dtype: torch.dtype, numel: int, shape: tuple,
                       chunk: int) -> int:
    passes = sce_passes(params, model_params, dtype, numel, shape)
    if passes > 1 and _gathers(numel, BUFFERS * chunk):
        passes -= RankSelect.passes_for(dtype) - 1  # the selection's passes become one gathering pass
    return passes + 1


class Buffers:
    def __init__(self, ctx: ChunkContext):
        n = ctx.out.numel()
        scratch = [b[:n] for b in ctx.buffers]
        self.variance, counts, masks, self.delta, self.total = scratch[:5]
        self.counts = counts.view({4: torch.int32, 8: torch.int64}[counts.element_size()])
        self.flags = counts  # 0/1 as numbers, once the tie counts are done with (a product with a bool
        # tensor would convert it into a chunk-sized temporary first)
        self.keep, self.equal, self.other, self.positive = bool_views(masks, n)[:4]


def variance(ctx: ChunkContext, out: torch.Tensor) -> torch.Tensor:
    """Population variance across the models of delta_i per entry: summed in float64 and rounded to the
    accumulation dtype, as torch.var (mergekit's) computes it for float32, a block at a time (elementwise, so
    ~6x faster than torch.var over a stacked dimension)."""
    n = out.numel()
    count = len(ctx.inputs)
    for a in range(0, n, VARIANCE_BLOCK):
        b = min(n, a + VARIANCE_BLOCK)
        # the task vectors as mergekit forms them (in the accumulation dtype), then widened
        deltas = [torch.sub(x[a:b], ctx.base[a:b], out=out[a:b]).to(torch.float64, copy=True) for x in ctx.inputs]
        # Sums start from their first term rather than from zero: they differ only in the sign of a zero mean,
        # which squaring removes, and a sum of squares never starts at -0.
        mean = torch.add(deltas[0], deltas[1]) if count > 1 else deltas[0].clone()
        for d in deltas[2:]:
            mean.add_(d)
        mean.div_(count)
        squares = deltas[0].sub_(mean).square_()
        for d in deltas[1:]:
            squares.add_(d.sub_(mean).square_())
        # (abs: the same bits for a variance, and the NaN an Inf input makes, -NaN on x86, one the selection ranks;
        # taken after the rounding to the output's dtype, which keeps the sign)
        out[a:b].copy_(squares.div_(count)).abs_()
    return out


class SceStats:
    def __init__(self, numel: int, n_models: int):
        self.numel, self.n_models = numel, n_models
        self.select: RankSelect | None = None
        self.zeros = 0
        self.nothing = False  # no entry selected
        self.bounds: Bounds | None = None
        self.gates = None
        self.squares: GroupSums | None = None
        self.weights: list[float] = []
        self.variance_of: tuple[int, torch.Tensor] | None = None  # (offset, variance) of the chunk last computed
        self.gathered: torch.Tensor | None = None  # the whole tensor's variance, in the method's buffers
        self.bits_area: np.ndarray | None = None  # where its kept entries are then stored: the first buffer's bytes
        self.kept_bits: np.ndarray | None = None  # the kept entries, packed 8 to a byte, once stored there

    def chunk_variance(self, ctx: ChunkContext, b: Buffers) -> torch.Tensor:
        """The chunk's variance, computed into b.variance once per chunk: when the whole tensor is one chunk, every
        pass sees the same chunk and the merge its tiles, which read their part of it (the first buffer is the
        method's own and nothing else writes it: a tile's other buffers lie in the other ones)."""
        n = ctx.out.numel()
        if self.variance_of is not None:
            start, held = self.variance_of
            if start <= ctx.offset and ctx.offset + n <= start + held.numel():
                return held[ctx.offset - start:ctx.offset - start + n]
        variance(ctx, b.variance)
        self.variance_of = (ctx.offset, b.variance)
        return b.variance

    def setup(self, ctx: ChunkContext) -> None:
        self.params = ctx.params
        self.squares = GroupSums(Groups("tensor", ctx.shape), self.n_models)
        if not _select_all(ctx.params):
            self.select = RankSelect([0], ctx.out.dtype)
            if _gathers(self.numel, ctx.gather_room()):
                self.gathered = ctx.arena[:self.numel]
                self.bits_area = ctx.arena.view(torch.uint8)[:-(-self.numel // 8)].numpy()
        self.select_passes = self.select.passes if self.select is not None else 0

    def new_gates(self) -> None:
        self.gates = self.bounds.new_gates() if self.bounds is not None else []

    def store_kept(self) -> None:
        """The gathered variance's kept entries as bits (in tensor order, so the tie gates count as over chunks),
        written over the variance as it is read: slice [a, b)'s bits, bytes [a/8, b/8), lie before its values,
        bytes [a * s, b * s) for s bytes a value, so no value is overwritten before it is read."""
        values, bits = self.gathered, self.bits_area
        keep, equal, other = (torch.empty(min(self.numel, KEEP_SLICE), dtype=torch.bool) for _ in range(3))
        counts = torch.empty(keep.numel(), dtype=INT_VIEW[values.dtype])
        gates = self.bounds.new_gates()
        for a in range(0, self.numel, KEEP_SLICE):
            part = values[a:a + KEEP_SLICE]
            n = part.numel()
            self.bounds.admit(part, keep[:n], other[:n])
            for gate in gates:
                gate.apply(part, keep[:n], equal[:n], counts[:n])
            bits[a // 8:-(-(a + n) // 8)] = np.packbits(keep[:n].numpy())
        self.kept_bits, self.gathered = bits, None

    def read_kept(self, offset: int, keep: torch.Tensor) -> torch.Tensor:
        """keep = the stored kept bits of elements [offset, offset + len(keep)) (offset: on the grid)."""
        kept = keep.numpy()
        for a in range(0, kept.size, KEEP_SLICE):
            n = min(KEEP_SLICE, kept.size - a)
            start = (offset + a) // 8
            kept[a:a + n] = np.unpackbits(self.kept_bits[start:start - (-n // 8)], count=n).view(bool)
        return keep


def _keep(stats: SceStats, ctx: ChunkContext, b: Buffers) -> torch.Tensor | None:
    """The selected entries of this chunk (None: all)."""
    if stats.select is None:
        return None
    if stats.nothing:
        b.keep.zero_()
        return b.keep
    if stats.kept_bits is not None:
        return stats.read_kept(ctx.offset, b.keep)
    values = stats.chunk_variance(ctx, b)
    stats.bounds.admit(values, b.keep, b.other)
    for gate in stats.gates:
        gate.apply(values, b.keep, b.equal, b.counts)
    return b.keep


def _delta(ctx: ChunkContext, i: int, keep: torch.Tensor | None, b: Buffers) -> torch.Tensor:
    torch.sub(ctx.inputs[i], ctx.base, out=b.delta)
    if keep is not None:
        keep_only(b.delta, keep, b.flags)  # (the flags' buffer is free here: scratch for the mask's bits)
    return b.delta


def sce_observe(stats: SceStats, pass_index: int, ctx: ChunkContext) -> None:
    if stats.squares is None:
        stats.setup(ctx)
    b = ctx.derived(Buffers)
    if pass_index < stats.select_passes:
        if stats.nothing or stats.select.done:
            return
        if stats.gathered is not None:  # (the first pass: the selection is made at its end)
            part = variance(ctx, stats.gathered[ctx.offset:ctx.offset + ctx.out.numel()])
            stats.zeros += part.numel() - int(part.count_nonzero())
            return
        values = stats.chunk_variance(ctx, b)
        if pass_index == 0:
            stats.zeros += values.numel() - int(values.count_nonzero())
        stats.select.observe(pass_index, values, b.counts, whole=values.numel() == ctx.numel)
        return
    if stats.nothing:
        return
    if ctx.offset == 0:
        stats.new_gates()
    keep = _keep(stats, ctx, b)
    if b.delta.numel() <= GRID:  # one grid block: every model's squares summed in one call
        squares = []
        for i in range(len(ctx.inputs)):
            delta = _delta(ctx, i, keep, b)  # (the same buffer for every model: squared before the next)
            squares.append(torch.mul(delta, delta))
        stats.squares.add_each(ctx.offset, squares)
        return
    for i in range(len(ctx.inputs)):
        delta = _delta(ctx, i, keep, b)
        stats.squares.add(i, ctx.offset, torch.mul(delta, delta, out=b.total))


def sce_finish(stats: SceStats, pass_index: int) -> int | None:
    if pass_index < stats.select_passes:
        if stats.nothing:
            return None
        if pass_index == 0:
            nonzero = stats.numel - stats.zeros
            # int(nonzero * density) as mergekit evaluates it (an int64 tensor times a float gives float32)
            k = int(torch.tensor(nonzero) * stats.params["select_topk"])
            if k == 0:
                stats.nothing = True
                return None
            stats.select.set_rank(0, stats.numel - k)
            if stats.gathered is not None:
                stats.select.select_held(stats.gathered)
                stats.bounds = bounds_from(stats.select, False)
                stats.store_kept()
                return stats.select_passes  # on to the squares pass
        stats.select.finish_pass(pass_index)
        if pass_index == stats.select_passes - 1:
            stats.bounds = bounds_from(stats.select, False)
        return None
    means = stats.squares.sums[:, 0] / max(stats.numel, 1)
    total = float(means.sum())
    if abs(total) < MIN_WEIGHT_SUM:
        stats.weights = [1.0 / stats.n_models] * stats.n_models
    else:
        stats.weights = (means / total).tolist()


def _default_dtype(weight: float) -> float:
    """The weight rounded as a product of it with a bool tensor rounds it: to torch's default dtype (float32),
    whatever the accumulation dtype."""
    return torch.tensor(weight, dtype=torch.get_default_dtype()).item()


def sce(ctx: ChunkContext, stats: SceStats | None) -> torch.Tensor:
    if stats is None or stats.nothing:  # nothing selected
        return ctx.out.copy_(ctx.base)
    b = ctx.derived(Buffers)
    if ctx.offset == 0:
        stats.new_gates()
    keep = _keep(stats, ctx, b)
    b.total.zero_()
    for i in range(len(ctx.inputs)):
        b.total.add_(_delta(ctx, i, keep, b))
    compare(np.greater_equal, b.total, 0, b.positive)  # the elected sign: + where the sum is >= 0
    mixed, divisor = ctx.out.zero_(), b.total.zero_()
    positive, agree, other = b.positive.numpy(), b.equal.numpy(), b.other.numpy()
    for i, weight in enumerate(stats.weights):
        delta = _delta(ctx, i, keep, b)
        # agree = where(positive, delta > 0, delta < 0), in numpy's bool operations (see masks.compare)
        compare(np.greater, delta, 0, b.equal)
        np.logical_and(agree, positive, out=agree)
        compare(np.less, delta, 0, b.other)
        np.greater(other, positive, out=other)  # delta < 0 where the sign is not positive
        np.logical_or(agree, other, out=agree)
        np.copyto(b.flags.numpy(), agree)  # as 0/1 numbers
        mixed.add_(delta.mul_(b.flags).mul_(weight))
        divisor.add_(b.flags.mul_(_default_dtype(weight)))
    mixed.div_(divisor.clamp_(min=MIN_DIVISOR))
    return mixed.add_(ctx.base)


SCE = Method(
    name="sce",
    help="SCE: keep the entries of largest variance across the models (select_topk), weight each task vector by "
         "its mean square, TIES sign election",
    merge=per_segment(sce), segmented=True, tiled=True,
    params=(Param("select_topk", 1.0, "fraction of the entries of nonzero variance to keep (largest variance)",
                  check=lambda v: None if 0.0 <= v <= 1.0 else "must be between 0 and 1"),
            INT8_MASK),
    needs_base=True, stat_passes=sce_passes, init_stats=SceStats, observe=sce_observe, finish_pass=sce_finish,
    streamed_reads=sce_streamed_reads, buffers=BUFFERS, min_models=1, typical={"parameters": {"select_topk": 0.5}},
)

METHODS = (SCE,)
