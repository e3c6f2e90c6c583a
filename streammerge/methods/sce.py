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
pass, and the squares and merge passes read the bits. Any other streamed tensor has its kept entries stored as
bits by the squares pass (numel / 8 bytes, counted in `stats_bytes`), which the merge pass reads instead of
computing the variance a fourth time.

The variance, each model's squares and the merge are compiled passes (`kernels.sce`: the same arithmetic as the
element-wise operations, bit for bit), split between the merge's threads, and so are the squares' sums
(`kernels.pairwise`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from streammerge.methods.masks import INT_VIEW
from streammerge.methods.method import GRID, ChunkContext, Method, Param, kernel_loader, per_segment
from streammerge.methods.streaming import Groups, GroupSums, RankSelect, bool_views, in_parallel, require_grid
from streammerge.methods.sparsifiers import Bounds, bounds_from
from streammerge.methods.task_vectors import INT8_MASK

# The fewest elements a thread takes in sce's kernels: a cache-sized tile (`method.TILE`) stays on one thread, a
# whole tensor's chunk is split. With the other kernels' 32 Ki, each tile went to both threads, and the full-size
# Llama merge took 6.3-6.7 s at 256 MiB against 5.3-6.3 s with this (its reported seconds, two runs each); the
# same at 4 GiB.
SCE_GRAIN = 1 << 20

MIN_WEIGHT_SUM = 1e-6  # below this sum of mean squares the models get equal weights (mergekit)
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


def kept_bytes(numel: int) -> int:
    """The bytes that hold one bit for each of `numel` entries."""
    return -(-numel // 8)


def sce_stats_bytes(params: dict, model_params: list[dict], dtype: torch.dtype, numel: int, shape: tuple) -> int:
    """A streamed tensor's kept entries as bits, from its squares pass to its merge pass."""
    return kept_bytes(numel) if 0 < params["select_topk"] < 1 else 0


def sce_streamed_reads(params: dict, model_params: list[dict], dtype: torch.dtype, numel: int, shape: tuple,
                       chunk: int) -> int:
    passes = sce_passes(params, model_params, dtype, numel, shape)
    if passes > 1:  # the selection's passes become one, which gathers the variance or brackets the rank
        passes -= RankSelect.passes_for(dtype) - 1
    return passes + 1


class Buffers:
    def __init__(self, ctx: ChunkContext):
        n = ctx.out.numel()
        scratch = [b[:n] for b in ctx.buffers]
        self.variance, counts, masks, self.delta, self.total = scratch[:5]
        self.counts = counts.view({4: torch.int32, 8: torch.int64}[counts.element_size()])
        self.keep, self.equal, self.other = bool_views(masks, n)[:3]


NO_MASK = np.zeros(1, dtype=bool)  # what the kernels get for a mask they do not read


def _arrays(ctx: ChunkContext, a: int, z: int) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Elements [a, z) of the models' inputs (a tuple, as the kernels take them) and of the base."""
    return tuple(x.numpy()[a:z] for x in ctx.inputs), ctx.base.numpy()[a:z]


def variance(ctx: ChunkContext, out: torch.Tensor) -> torch.Tensor:
    """Population variance across the models of delta_i per entry (`kernels.sce.variance`): each task vector made
    as mergekit forms it (in the accumulation dtype), summed in float64 and rounded to the accumulation dtype, as
    torch.var (mergekit's) computes it for float32. The sums start from their first term rather than from zero:
    they differ only in the sign of a zero mean, which squaring removes. Its absolute value: the same bits for a
    variance, and the NaN an Inf input makes (-NaN on x86) becomes one the selection ranks."""
    from streammerge.kernels import sce as kernels  # (numba: imported by this method's merges)
    values = out.numpy()
    in_parallel(out.numel(), lambda a, z: kernels.variance(*_arrays(ctx, a, z), values[a:z]), grain=SCE_GRAIN)
    return out


def _mask(keep: torch.Tensor | None) -> tuple[Callable[[int, int], np.ndarray], bool]:
    """The kernels' selection mask of an element range, and whether they read it (None: every entry is selected,
    and they get a stand-in)."""
    if keep is None:
        return (lambda a, z: NO_MASK), False
    kept = keep.numpy()
    return (lambda a, z: kept[a:z]), True


def _add_squares(sums: GroupSums, ctx: ChunkContext, keep: torch.Tensor | None) -> None:
    """Add each model's squared task vector, where `keep` holds (None: everywhere), to its sum: the grid blocks'
    sums made by `kernels.sce.squares_block_sums` (the squares formed inside the sums) on the merge's threads, then
    added in block order, as `GroupSums.add` adds them."""
    from streammerge.kernels import sce as kernels
    require_grid(ctx.offset)
    n = ctx.out.numel()
    inputs, base = _arrays(ctx, 0, n)
    mask, selects = _mask(keep)
    block_sums = np.empty((-(-n // GRID), len(inputs)), dtype=np.float64)

    def work(a: int, z: int) -> None:
        start, stop = a * GRID, min(n, z * GRID)
        kernels.squares_block_sums(tuple(x[start:stop] for x in inputs), base[start:stop], mask(start, stop),
                                   selects, GRID, block_sums[a:z])

    in_parallel(block_sums.shape[0], work, grain=max(1, SCE_GRAIN // GRID))
    sums.add_block_sums(block_sums)


def _store_bits(bits: np.ndarray, offset: int, keep: np.ndarray) -> None:
    """Elements [offset, offset + len(keep)) of `keep` packed 8 to a byte into `bits` (offset: a multiple of 8)."""
    bits[offset // 8:kept_bytes(offset + keep.size)] = np.packbits(keep)


class SceStats:
    def __init__(self, numel: int, n_models: int):
        self.numel, self.n_models = numel, n_models
        self.select: RankSelect | None = None
        self.zeros = 0
        self.nothing = False  # no entry selected
        self.bounds: Bounds | None = None
        self.gates = None
        self.squares: GroupSums | None = None
        self.weights: tuple[np.ndarray, np.ndarray] | None = None  # (w_i, v_i) as `kernels.sce.merge` takes them
        self.variance_of: tuple[int, torch.Tensor] | None = None  # (offset, variance) of the chunk last computed
        self.gathered: torch.Tensor | None = None  # the whole tensor's variance, in the method's buffers
        self.bits_area: np.ndarray | None = None  # where its kept entries are then stored: the first buffer's bytes
        self.kept_bits: np.ndarray | None = None  # the kept entries, packed 8 to a byte, once stored there
        self.storing: np.ndarray | None = None  # where the squares pass of a streamed tensor stores them

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
        self.dtype = ctx.out.numpy().dtype  # (the accumulation dtype, numpy's: the kernels' weights are in it)
        self.squares = GroupSums(Groups("tensor", ctx.shape), self.n_models)  # (sums added by `_add_squares`)
        if not _select_all(ctx.params):
            self.select = RankSelect([0], ctx.out.dtype)
            if _gathers(self.numel, ctx.gather_room()):
                self.gathered = ctx.arena[:self.numel]
                self.bits_area = ctx.arena.view(torch.uint8)[:kept_bytes(self.numel)].numpy()
            elif ctx.gather_room():  # (the first pass holds the variance in the first buffer: the others are free)
                self.select.bracket_streamed(ctx.buffers_from(1), self.numel, compiled=True)
            elif ctx.arena is not None:  # (held whole: the variance in the first buffer, the second the room)
                self.select.bracket_whole(ctx.buffers_from(2), compiled=True)
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
            _store_bits(bits, a, keep[:n].numpy())
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
    if stats.storing is not None:  # (chunks start on the grid, so on a byte)
        _store_bits(stats.storing, ctx.offset, b.keep.numpy())
    return b.keep


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
            zeros = values.numel() - int(values.count_nonzero())
            stats.zeros += zeros
            if ctx.offset == 0:  # the rank as the first chunk's share of zeros foretells it (for a bracketing pass)
                stats.select.set_rank(0, _rank(stats, round(stats.numel * (1 - zeros / values.numel()))))
        stats.select.observe(pass_index, values, b.counts, whole=values.numel() == ctx.numel)
        return
    if stats.nothing:
        return
    if ctx.offset == 0:
        stats.new_gates()
        if stats.select is not None and stats.kept_bits is None and ctx.out.numel() < stats.numel:
            stats.storing = np.empty(kept_bytes(stats.numel), dtype=np.uint8)
    _add_squares(stats.squares, ctx, _keep(stats, ctx, b))


def sce_finish(stats: SceStats, pass_index: int) -> int | None:
    if pass_index < stats.select_passes:
        if stats.nothing:
            return None
        if pass_index == 0:
            rank = _rank(stats, stats.numel - stats.zeros)
            if rank == stats.numel:
                stats.nothing = True
                return None
            stats.select.set_rank(0, rank)
            if stats.gathered is not None:
                stats.select.select_held(stats.gathered)
                stats.bounds = bounds_from(stats.select, False)
                stats.store_kept()
                return stats.select_passes  # on to the squares pass
        if stats.select.finish_pass(pass_index) == 0:  # a bracketing pass that missed: the histogram passes
            stats.zeros = 0  # (counted again by their first)
            return 0
        if stats.select.done or pass_index == stats.select_passes - 1:
            stats.bounds = bounds_from(stats.select, False)
            return stats.select_passes  # (the squares pass, at once where the selection was bracketed)
        return None
    if stats.storing is not None:  # the squares pass has stored every chunk's kept entries
        stats.kept_bits, stats.storing = stats.storing, None
    means = stats.squares.sums[:, 0] / max(stats.numel, 1)
    total = float(means.sum())
    weights = [1.0 / stats.n_models] * stats.n_models if abs(total) < MIN_WEIGHT_SUM else (means / total).tolist()
    # each weight rounded to the accumulation dtype as a product with a tensor rounds a Python number, its share of
    # the divisor first to float32 (mergekit multiplies it by a bool tensor)
    stats.weights = (np.array(weights, dtype=stats.dtype),
                     np.array([_default_dtype(w) for w in weights], dtype=stats.dtype))


def _rank(stats: SceStats, nonzero: int) -> int:
    """The rank of the threshold: the largest k = int(nonzero * select_topk) variances are kept (k as mergekit
    evaluates it: an int64 tensor times a float gives float32); the tensor's size where k is 0."""
    return stats.numel - int(torch.tensor(nonzero) * stats.params["select_topk"])


def _default_dtype(weight: float) -> float:
    """The weight rounded as a product of it with a bool tensor rounds it: to torch's default dtype (float32),
    whatever the accumulation dtype."""
    return torch.tensor(weight, dtype=torch.get_default_dtype()).item()


def sce(ctx: ChunkContext, stats: SceStats | None) -> torch.Tensor:
    """The elected sign is + where the sum of the (selected) deltas is >= 0; each model's delta counts where it has
    that sign, times its weight, and the sum of those weights divides (`kernels.sce.merge`)."""
    if stats is None or stats.nothing:  # nothing selected
        return ctx.out.copy_(ctx.base)
    from streammerge.kernels import sce as kernels
    b = ctx.derived(Buffers)
    if ctx.offset == 0:
        stats.new_gates()
    mask, selects = _mask(_keep(stats, ctx, b))
    out = ctx.out.numpy()
    in_parallel(ctx.out.numel(), lambda a, z: kernels.merge(*_arrays(ctx, a, z), mask(a, z), selects,
                                                            *stats.weights, out[a:z]), grain=SCE_GRAIN)
    return ctx.out


SCE = Method(
    name="sce",
    help="SCE: keep the entries of largest variance across the models (select_topk), weight each task vector by "
         "its mean square, TIES sign election",
    merge=per_segment(sce), segmented=True, tiled=True,
    params=(Param("select_topk", 1.0, "fraction of the entries of nonzero variance to keep (largest variance)",
                  check=lambda v: None if 0.0 <= v <= 1.0 else "must be between 0 and 1"),
            INT8_MASK),
    needs_base=True, stat_passes=sce_passes, init_stats=SceStats, observe=sce_observe, finish_pass=sce_finish,
    streamed_reads=sce_streamed_reads, buffers=BUFFERS, stats_bytes=sce_stats_bytes, min_models=1,
    typical={"parameters": {"select_topk": 0.5}}, load=kernel_loader("sce", "brackets"),
)

METHODS = (SCE,)
