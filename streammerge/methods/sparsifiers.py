"""Which entries of a task vector (delta = model - base) a task-vector method keeps.

- `NONE`: all of them (task arithmetic);
- `MAGNITUDE` (TIES): the `density` fraction of largest |delta| over the whole tensor;
- `OUTLIERS` (Model Breadcrumbs): the same, after dropping the `gamma` fraction of largest as outliers;
- `RANDOM` (DARE): each entry with probability `density`;
- `MAGPRUNE` (DELLA): each entry with a probability that rises with its magnitude's rank along dimension 1,
  density +- epsilon.

The magnitude thresholds are exact whole-tensor order statistics (streaming radix selection, with ties broken
by position), the random draws are counter-based (`streaming.Uniform`), so what is kept never depends on the
chunk size.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from streammerge.errors import StreamMergeError
from streammerge.methods.masks import INT_VIEW, keep_only
from streammerge.methods.method import ChunkContext, kernel_loaded
from streammerge.methods.streaming import (BRACKET_FROM, DRAW_GRAIN, Groups, GroupSums, RangeWork, RankSelect,
                                           TieGate, Uniform, bool_views, in_parallel)

RESCALE_EPS = 1e-7  # below this L1 norm a magnitude-pruned delta is left unscaled
# DELLA ranks at most 1/MAGPRUNE_SHARE of a chunk at once: its temporaries (int64 sort keys and, for float64
# deltas, their magnitudes from the first buffer it reserves, 16 bytes per ranked element; float32 draws from the
# second) fit the two buffers for either accumulation dtype; float32 deltas ranked by their keys alone take twice
# that share (`_ranks_by_keys`). As large a share as fits: each ranking call has a cost of its own, and at small
# budgets the calls are many (the Llama set at 256 MiB: 8.8-9.6 s with half a chunk, 10.6-11.7 s with a quarter).
MAGPRUNE_SHARE = 4
MAGPRUNE_BUFFERS = 2


class Sparsifier(enum.Enum):
    NONE = "none"
    MAGNITUDE = "magnitude"
    OUTLIERS = "outliers"
    RANDOM = "random"
    MAGPRUNE = "magprune"

    @property
    def by_magnitude(self) -> bool:
        """Keeps entries by their magnitude's rank in the whole tensor (needs statistics passes)."""
        return self in (Sparsifier.MAGNITUDE, Sparsifier.OUTLIERS)

    @property
    def random(self) -> bool:
        """Keeps entries by random draws (rescaling divides by the keep probability)."""
        return self in (Sparsifier.RANDOM, Sparsifier.MAGPRUNE)


class Buffers:
    """Names for a task-vector method's buffers within one chunk: the first `MIN_BUFFERS` are used here."""

    MIN_BUFFERS = 4

    def __init__(self, ctx: ChunkContext):
        n = ctx.out.numel()
        buffers = [b[:n] for b in ctx.buffers]
        self.delta, self.magnitude, counts, masks = buffers[:self.MIN_BUFFERS]
        self.counts = counts.view({4: torch.int32, 8: torch.int64}[counts.element_size()])
        self.keep, self.equal, self.other, self.flag = bool_views(masks, n)[:4]
        self.rest = buffers[self.MIN_BUFFERS:]


# -- which elements a magnitude sparsifier keeps -------------------------------------------------------------
KEEP_ALL, DROP_ALL = "all", "none"


def magnitude_ranks(sparsifier: Sparsifier, model: dict, numel: int):
    """KEEP_ALL, DROP_ALL, or the ascending ranks (first kept, last kept or None for the largest) of a magnitude
    sparsifier, in the order (|delta|, position); KEEP_ALL without a sparsifier (`task_arithmetic`)."""
    if sparsifier is Sparsifier.NONE:
        return KEEP_ALL
    density = model["density"]
    if density >= 1:
        return KEEP_ALL
    if sparsifier is Sparsifier.MAGNITUDE:
        if density <= 0 or numel == 0:
            return DROP_ALL
        k = max(1, int(density * numel))
        return (numel - k, None) if k < numel else KEEP_ALL
    target, top = int(density * numel), int(model["gamma"] * numel)
    if target == 0:
        return DROP_ALL
    bottom = max(0, numel - target - top)
    last = bottom + target - 1
    return (bottom, None if last >= numel - 1 else last) if (bottom or last < numel - 1) else KEEP_ALL


@dataclass
class Bounds:
    """The kept magnitudes: those above `low` and below `high` (None: no upper bound), each bound admitted itself
    when every element equal to it is kept, and otherwise elements equal to it admitted by position (`gates`)."""

    low: float
    high: float | None
    gates: list[tuple[float, int, int, int]]  # (value, first, stop, total): positions among the equal elements
    low_inclusive: bool = False
    high_inclusive: bool = False

    def new_gates(self) -> list[TieGate]:
        return [TieGate(*g) for g in self.gates]

    def limits(self, dtype: np.dtype, admitted: tuple[float, ...] = ()) -> tuple[np.floating, np.floating]:
        """The kept magnitudes as an inclusive range of `dtype` (before the gates; a bound among the gate values
        `admitted` taken as inclusive): an exclusive bound becomes the next value inward, which keeps the same
        values of that dtype (+Inf as an exclusive low bound keeps nothing: NaN)."""
        as_dtype = np.dtype(dtype).type
        low, high = as_dtype(self.low), as_dtype(math.inf if self.high is None else self.high)
        if not (self.low_inclusive or self.low in admitted):
            low = np.nextafter(low, as_dtype(math.inf)) if low < math.inf else as_dtype(math.nan)
        if self.high is not None and not (self.high_inclusive or self.high in admitted):
            high = np.nextafter(high, as_dtype(-math.inf))
        return low, high

    def admit(self, values: torch.Tensor, keep: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        """keep = the values within the bounds (before the gates); scratch: a bool mask as long."""
        self.admit_array(values.numpy(), keep.numpy(), scratch.numpy())
        return keep

    def admit_array(self, values: np.ndarray, keep: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        """`admit` on numpy arrays: numpy compares into a bool mask several times faster than torch, and a call
        costs a fraction of a torch one. The bounds are values of the array's dtype, so comparing in that dtype
        is exact."""
        as_dtype = values.dtype.type
        (np.greater_equal if self.low_inclusive else np.greater)(values, as_dtype(self.low), out=keep)
        if self.high is not None:
            keep &= (np.less_equal if self.high_inclusive else np.less)(values, as_dtype(self.high), out=scratch)
        return keep


def bounds_from(select: RankSelect, has_high: bool) -> Bounds:
    low, low_before, low_equal = select.value(0), select.ties_before(0), select.count_equal[0]
    if not has_high:
        gates = [(low, low_before, low_equal, low_equal)] if low > 0 else []
        return _inclusive(Bounds(low, None, gates))
    high, high_before, high_equal = select.value(1), select.ties_before(1), select.count_equal[1]
    if high == low:
        gates = [(low, low_before, high_before + 1, low_equal)] if low > 0 else []
    else:
        gates = ([(low, low_before, low_equal, low_equal)] if low > 0 else []) + \
                ([(high, 0, high_before + 1, high_equal)] if high > 0 else [])
    return _inclusive(Bounds(low, high, gates))


def _inclusive(bounds: Bounds) -> Bounds:
    """A gate admitting every element equal to its value becomes an inclusive bound: the same elements kept,
    without counting them chunk by chunk (with distinct magnitudes, the usual case, no gate remains)."""
    for gate in list(bounds.gates):
        value, first, stop, total = gate
        if first == 0 and stop == total:
            bounds.gates.remove(gate)
            bounds.low_inclusive |= value == bounds.low
            bounds.high_inclusive |= value == bounds.high
    return bounds


class MagnitudeStats:
    """Per model: the radix selection of its thresholds, then (with `rescale`) the L1 norms before and after. A
    tensor streamed in chunks is bracketed by the compiled pass the method loads (`Method.load`)."""

    def __init__(self):
        self.ready = False

    def setup(self, sparsifier: Sparsifier, ctx: ChunkContext, dtype: torch.dtype) -> None:
        self.sparsifier = sparsifier
        self.ranks = [magnitude_ranks(sparsifier, m, ctx.numel) for m in ctx.model_params]
        self.selects = [RankSelect([r[0]] + ([r[1]] if r[1] is not None else []), dtype)
                        if isinstance(r, tuple) else None for r in self.ranks]
        self.select_passes = RankSelect.passes_for(dtype)
        self.rescale = ctx.params.get("rescale", False)
        self.bounds: list[Bounds | None] = [None] * len(self.ranks)
        self.norms = GroupSums(Groups("tensor", ctx.shape), 2 * len(self.ranks))  # (all, kept) per model
        self.factors = [1.0] * len(self.ranks)
        self.merge_gates = None
        selecting = [i for i, s in enumerate(self.selects) if s is not None]
        self.gathering = gathering(ctx, selecting)
        if self.gathering is None and selecting and ctx.gather_room():
            # (the first pass observes in the first two buffers: the others are free until the selection is made)
            rooms = ctx.buffers_from(2)
            per = rooms.numel() // len(selecting)
            for k, i in enumerate(selecting):
                self.selects[i].bracket_streamed(rooms[k * per:(k + 1) * per], ctx.numel,
                                                 kernel_loaded("brackets"))
        self.ready = True


class Gathering:
    """For a tensor streamed in chunks: the |delta| of its selecting models, where they fit the method's buffers
    (`ChunkContext.arena`) together, one tensor-sized area each. The first statistics pass gathers them there and
    selects their thresholds at its end by partition, as for a tensor held whole: one read instead of one per radix
    pass. The buffers are free until the selection is made (the rescale and merge passes come after it)."""

    def __init__(self, models: list[int], arena: torch.Tensor, numel: int):
        self.areas = {i: arena[k * numel:(k + 1) * numel] for k, i in enumerate(models)}


def gathering(ctx: ChunkContext, models: list[int]) -> Gathering | None:
    """Where the selecting models' magnitudes fit the buffers together, their `Gathering` (else the first pass
    brackets their ranks)."""
    fits = bool(models) and len(models) * ctx.numel <= ctx.gather_room()
    return Gathering(models, ctx.arena, ctx.numel) if fits else None


def magnitude_streamed_reads(sparsifier: Sparsifier):
    """`Method.streamed_reads` of a magnitude sparsifier: the radix passes become one, which gathers the models'
    magnitudes where they fit the buffers, else brackets the ranks (their ranges hold them but for a tensor whose
    first chunk is unlike the rest: then the radix passes follow)."""
    def reads(params: dict, model_params: list[dict], dtype: torch.dtype, numel: int, shape: tuple, chunk: int) -> int:
        passes = magnitude_passes(sparsifier, params, model_params, dtype, numel)
        return passes - RankSelect.passes_for(dtype) + 2 if passes else 1  # (+ the merge pass)

    return reads


def magnitude_passes(sparsifier: Sparsifier, params: dict, model_params: list[dict], dtype: torch.dtype,
                     numel: int) -> int:
    if not any(isinstance(magnitude_ranks(sparsifier, m, numel), tuple) for m in model_params):
        return 0
    return RankSelect.passes_for(dtype) + (1 if params.get("rescale") else 0)


def prune_by_magnitude(sparsifier: Sparsifier, i: int, ctx: ChunkContext, stats: MagnitudeStats, b: Buffers,
                       gates: list[TieGate]) -> None:
    """Zero the entries of b.delta outside model i's kept magnitude range (b.magnitude gets |delta|)."""
    ranks = magnitude_ranks(sparsifier, ctx.model_params[i], ctx.numel)
    if ranks == KEEP_ALL:
        return
    if ranks == DROP_ALL:
        b.delta.zero_()
        return
    torch.abs(b.delta, out=b.magnitude)
    stats.bounds[i].admit(b.magnitude, b.keep, b.other)
    for gate in gates:
        gate.apply(b.magnitude, b.keep, b.equal, b.counts)
    keep_only(b.delta, b.keep, b.magnitude)  # the magnitudes are no longer needed


def merged_within_bounds(ctx: ChunkContext, stats: MagnitudeStats | None, sparsifier: Sparsifier, out: torch.Tensor,
                         elect: bool) -> RangeWork:
    """The merge of a chunk with a magnitude sparsifier, or none (every delta kept), in one compiled pass
    (`kernels.magnitude`: TIES' with `elect`, else the plain sum of the kept deltas), as a function of an element
    range [a, z) of the chunk, written to `out`. Ties at a bound admitted by position (`stats.merge_gates`) become index ranges of the chunk
    (`TieGate.span`) within which that bound is inclusive: the chunk is merged piece by piece, each with its own
    bounds per model (so this must be called on the chunks in order). `stats` is None where no model selects (each
    keeps all or nothing)."""
    from streammerge.kernels import magnitude  # (numba: imported by the merges that select by magnitude)
    inputs, base = tuple(x.numpy() for x in ctx.inputs), ctx.base.numpy()
    dtype, n = base.dtype, base.size
    ranks = stats.ranks if stats is not None else [magnitude_ranks(sparsifier, m, ctx.numel) for m in ctx.model_params]
    gates = stats.merge_gates if stats is not None else [[] for _ in ranks]
    spans = [[gate.span(x, base) for gate in model_gates] for x, model_gates in zip(inputs, gates)]
    keep_all = np.array([r == KEEP_ALL for r in ranks])
    factors = np.array(stats.factors if stats is not None else [1.0] * len(ranks), dtype=dtype)
    weights = np.array([m["weight"] for m in ctx.model_params], dtype=dtype)
    nothing = (dtype.type(math.nan),) * 2  # (within no bounds: DROP_ALL; KEEP_ALL ignores them)

    def limits(i: int, p: int, q: int) -> tuple:
        if not isinstance(ranks[i], tuple):
            return nothing
        admitted = tuple(gate.value for gate, (start, stop) in zip(gates[i], spans[i]) if start <= p and q <= stop)
        return stats.bounds[i].limits(dtype, admitted)

    cuts = sorted({0, n, *(place for model in spans for span in model for place in span)})
    pieces = []
    for p, q in zip(cuts, cuts[1:]):
        lows, highs = (np.array(bounds, dtype=dtype) for bounds in zip(*(limits(i, p, q) for i in range(len(ranks)))))
        pieces.append((p, q, lows, highs))
    normalize, scale = bool(ctx.params["normalize"]), float(ctx.params["lambda"])
    out_array = out.numpy()
    finish = (normalize, scale) if elect else (normalize, weight_divisor(ctx.model_params), scale)
    kernel = magnitude.merge_within_by_sign if elect else magnitude.merge_within

    def step(a: int, z: int) -> None:
        for p, q, lows, highs in pieces:
            p, q = max(a, p), min(z, q)
            if p < q:
                kernel(tuple(x[p:q] for x in inputs), base[p:q], lows, highs, keep_all, factors, weights,
                       out_array[p:q], *finish)

    return step


def weight_divisor(model_params: list[dict]) -> float:
    """What `normalize` divides a sum of weighted deltas by without sign consensus: the sum of the weights (1 where
    that is about 0)."""
    divisor = sum(m["weight"] for m in model_params)
    return divisor if abs(divisor) >= 1e-8 else 1.0


# -- runs of whole small tensors (`Method.segmented`): per-tensor work on numpy views, the rest on the run -----
def magnitude_segment_stats(sparsifier: Sparsifier):
    """`Method.segment_stats` of a magnitude sparsifier: each segment's thresholds, selected on the run's |delta|
    (one torch operation per model for the whole run, then numpy on each segment). None, so that each segment
    makes its own passes, where a rescale needs the norms of the pruned deltas."""
    def segment_stats(ctx: ChunkContext) -> list[MagnitudeStats | None] | None:
        if ctx.params.get("rescale", False):
            return None
        b = ctx.derived(Buffers)
        segments = []
        for seg in ctx.segments:
            ranks = [magnitude_ranks(sparsifier, m, seg.numel) for m in ctx.model_params]
            segments.append(SegmentStats(ranks) if any(isinstance(r, tuple) for r in ranks) else None)
        for i, x in enumerate(ctx.inputs):
            torch.sub(x, ctx.base, out=b.magnitude).abs_()
            bits = b.magnitude.view(INT_VIEW[b.magnitude.dtype]).numpy()
            for seg, stats in zip(ctx.segments, segments):
                ranks = stats.ranks[i] if stats is not None else None
                if not isinstance(ranks, tuple):
                    continue
                select = RankSelect([r for r in ranks if r is not None], b.magnitude.dtype)
                part = bits[seg.start:seg.stop]
                if not select.select_bits(part, part):  # (its own scratch: |delta| is made again to merge)
                    return None  # a pattern the histogram passes refuse: each segment's own passes say so
                stats.bounds[i] = bounds_from(select, ranks[1] is not None)
        return segments

    return segment_stats


class SegmentStats:
    """What merging a segment needs of its magnitude statistics (the fields of `MagnitudeStats` it reads)."""

    def __init__(self, ranks: list):
        self.ranks = ranks
        self.bounds: list[Bounds | None] = [None] * len(ranks)
        self.factors = [1.0] * len(ranks)


def prune_segments_by_magnitude(sparsifier: Sparsifier, i: int, ctx: ChunkContext, stats: list, b: Buffers) -> None:
    """`prune_by_magnitude` of every segment of a run, each with its own statistics (SegmentStats or
    MagnitudeStats, or None where no model selects), then the run's entries not kept zeroed at once."""
    torch.abs(b.delta, out=b.magnitude)
    magnitude, keep, other = b.magnitude.numpy(), b.keep.numpy(), b.other.numpy()
    model = ctx.model_params[i]
    for seg, seg_stats in zip(ctx.segments, stats):
        start, stop = seg.start, seg.stop
        ranks = magnitude_ranks(sparsifier, model, seg.numel)
        if ranks == KEEP_ALL or ranks == DROP_ALL:
            keep[start:stop] = ranks == KEEP_ALL  # (zeroing the bits gives the +0 of delta.zero_())
            continue
        bounds = seg_stats.bounds[i]
        bounds.admit_array(magnitude[start:stop], keep[start:stop], other[start:stop])
        for gate in bounds.new_gates():  # (ties at a threshold, rare: as for a whole tensor)
            gate.apply(b.magnitude[start:stop], b.keep[start:stop], b.equal[start:stop], b.counts[start:stop])
    keep_only(b.delta, b.keep, b.magnitude)
    for seg, seg_stats in zip(ctx.segments, stats):
        if seg_stats is not None and seg_stats.factors[i] != 1.0:
            b.delta[seg.start:seg.stop].mul_(seg_stats.factors[i])


# -- statistics passes for the magnitude sparsifiers ---------------------------------------------------------
def magnitude_observe(sparsifier: Sparsifier):
    def observe(stats: MagnitudeStats, pass_index: int, ctx: ChunkContext) -> None:
        if not stats.ready:
            stats.setup(sparsifier, ctx, ctx.out.dtype)
        b = ctx.derived(Buffers)
        if pass_index < stats.select_passes:
            whole = pass_index == 0 and ctx.out.numel() == ctx.numel  # then selected at once: one pass
            if stats.gathering is not None:  # gathered, then selected at the pass's end
                for i, area in stats.gathering.areas.items():
                    area = area[ctx.offset:ctx.offset + ctx.out.numel()]
                    torch.sub(ctx.inputs[i], ctx.base, out=area).abs_()
                return
            # (a bracketing's room is the first buffer, its threads' scratch the others)
            free = ctx.buffers_from(1) if whole and ctx.arena is not None else None
            for i, select in enumerate(stats.selects):
                if select is None or select.done:
                    continue
                if whole and ctx.numel >= BRACKET_FROM and select.select_deltas(
                        ctx.inputs[i], ctx.base, b.delta, kernel_loaded("brackets"), free):
                    continue  # (bracketed from the inputs: the magnitudes are made again to merge)
                if whole:
                    torch.sub(ctx.inputs[i], ctx.base, out=b.magnitude).abs_()
                    select.select_whole(b.magnitude, b.magnitude)  # (its own scratch: made again to merge)
                else:
                    select.observe(pass_index, torch.sub(ctx.inputs[i], ctx.base, out=b.delta).abs_(), b.magnitude)
            return
        # the rescale pass: L1 norm of each pruned delta against that of the whole delta
        if ctx.offset == 0:
            stats.rescale_gates = [bd.new_gates() if bd is not None else [] for bd in stats.bounds]
        for i, select in enumerate(stats.selects):
            if select is None:
                continue
            torch.sub(ctx.inputs[i], ctx.base, out=b.delta)
            torch.abs(b.delta, out=b.magnitude)
            stats.norms.add(2 * i, ctx.offset, b.magnitude)
            prune_by_magnitude(sparsifier, i, ctx, stats, b, stats.rescale_gates[i])
            stats.norms.add(2 * i + 1, ctx.offset, b.delta.abs_())

    return observe


def magnitude_finish(stats: MagnitudeStats, pass_index: int) -> int | None:
    if pass_index < stats.select_passes:
        gathering = stats.gathering
        restart = False
        for i, select in enumerate(stats.selects):
            if select is None:
                continue
            if gathering is not None:  # (magnitudes: no sign bit, so selected at once, `done`)
                select.select_whole(gathering.areas[i], gathering.areas[i])  # (its own scratch)
                continue
            restart |= select.finish_pass(pass_index) == 0  # (a bracketing pass that missed: the histograms' turn)
        if restart:
            return 0
        if pass_index < stats.select_passes - 1 and not all(s is None or s.done for s in stats.selects):
            return None
        for i, select in enumerate(stats.selects):
            if select is not None:
                stats.bounds[i] = bounds_from(select, stats.ranks[i][1] is not None)
        return stats.select_passes  # the selection is made: on to the rescale pass, if any
    for i, select in enumerate(stats.selects):
        if select is None:
            continue
        before, after = stats.norms.sums[2 * i, 0].item(), stats.norms.sums[2 * i + 1, 0].item()
        stats.factors[i] = before / after if before >= RESCALE_EPS and after >= RESCALE_EPS else 1.0
    return None


# -- random sparsifiers --------------------------------------------------------------------------------------
def _dare_draws(i: int, ctx: ChunkContext, x: torch.Tensor, sums: tuple[torch.Tensor, ...], weight: float,
                first: bool) -> Callable[[Uniform, int, int, int], None]:
    """DARE, fused with the merge's step (`kernels.dare`): `draw(uniform, start, a, z)` takes model i's task vector
    `x - base` over the chunk's elements [a, z), keeps each entry with probability `density` by the numbers of
    `uniform` from element `start` on (divided by it with `rescale`), times `weight`, and adds it to `sums` (the
    total, or the four sums of TIES' sign consensus; to +0 for the `first` model, their contents not read)."""
    from streammerge.kernels import dare  # (numba: imported by the merges that draw)
    density = ctx.model_params[i]["density"]
    drops = 0 < density < 1  # (at 1 every entry is kept unscaled, at 0 none: the same bits as no draw at all)
    as_dtype = sums[0].numpy().dtype.type
    threshold = float(as_dtype(density)) if drops else math.inf if density >= 1 else -math.inf  # kept: u < it
    rescale = drops and bool(ctx.params["rescale"])
    kernel = dare.add_dropped_by_sign if len(sums) > 1 else dare.add_dropped
    arrays = [t.numpy() for t in (x, ctx.base, *sums)]

    def draw(uniform: Uniform, start: int, a: int, z: int) -> None:
        kernel(*(array[a:z] for array in arrays), start, uniform.stream, threshold, density, rescale, weight, first)

    return draw


def randomly_pruned_step(i: int, ctx: ChunkContext, x: torch.Tensor, sums: tuple[torch.Tensor, ...],
                         weight: float, first: bool) -> RangeWork:
    """`_dare_draws` of a chunk of one tensor as a function of an element range [a, z) of the chunk."""
    draw, uniform = _dare_draws(i, ctx, x, sums, weight, first), Uniform(ctx.seed, ctx.name, i)
    return lambda a, z: draw(uniform, ctx.offset + a, a, z)


def add_randomly_pruned_segments(i: int, ctx: ChunkContext, x: torch.Tensor, sums: tuple[torch.Tensor, ...],
                                 weight: float, first: bool) -> None:
    """`_dare_draws` in a run of small tensors (`ctx.segments`): each tensor's numbers drawn on its segment, from
    its own stream, split between the merge's threads."""
    draw = _dare_draws(i, ctx, x, sums, weight, first)
    for seg in ctx.segments:
        uniform = Uniform(ctx.seed, seg.name, i)
        in_parallel(seg.numel, lambda a, z: draw(uniform, a, seg.start + a, seg.start + z), grain=DRAW_GRAIN)


def _magprune_unit(shape: tuple, numel: int) -> tuple[int, int]:
    """DELLA ranks magnitudes along dimension 1: the contiguous unit holding whole such vectors (a row of a
    matrix, a [dim1, rest] slab of a larger tensor, all of a 1-D tensor) and the size of `rest`."""
    if len(shape) < 2:
        return max(numel, 1), 1
    return math.prod(shape[1:]), math.prod(shape[2:])


def _magprune_scratch(ctx: ChunkContext, n: int) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """int64 sort keys or order, float64 magnitudes (for float64 deltas) and float32 draws for n ranked elements,
    carved from the method's two reserved buffers (n is at most half a chunk for float32 deltas ranked by their
    keys, which use no magnitudes, a quarter for other float32 ones, an eighth for float64)."""
    first, second = (b.view(torch.uint8) for b in ctx.buffers[-MAGPRUNE_BUFFERS:])
    keys = first[:8 * n].view(torch.int64).numpy()
    magnitude = first[8 * n:16 * n].view(torch.float64)
    draws = second[:4 * n].view(torch.float32).numpy()
    return keys, magnitude, draws


def _probability_by_rank(span: int, density: float, epsilon: float, dtype: torch.dtype) -> torch.Tensor:
    """DELLA's keep probability of each rank along a vector of `span` elements, the same arithmetic on each rank
    as on a whole tensor of ranks (shared by every vector of that length and parameters: read only)."""
    by_rank = torch.arange(span, dtype=dtype)
    by_rank = by_rank.div_(span - 1) if span > 1 else by_rank.zero_()
    return by_rank.mul_(2 * epsilon).add_(density - epsilon)


RANKED_BATCH = 1 << 16  # elements ranked and pruned at a time by a thread: keys, draws and values stay in its cache
# Row lengths (a matrix's dimension 1) recur tensor after tensor; a long 1-D tensor's probabilities are made for it
# alone, so what the cache keeps outside the budget stays small (at most 16 x 32Ki float64: 4 MiB).
CACHED_RANKS = 1 << 15
_probability_by_rank_cached = functools.lru_cache(maxsize=16)(_probability_by_rank)


def _ranks_by_keys(dtype: torch.dtype, span: int) -> bool:
    """Whether vectors of `span` deltas of `dtype` are ranked by sorting int64 keys (float32 magnitude bits above
    each element's position), not by torch's argsort of float64 magnitudes."""
    from streammerge.kernels import magprune  # (numba: imported by the merges that use it)
    return dtype == torch.float32 and 31 + magprune.position_bits(span) <= 63


@dataclass(frozen=True)
class Pruning:
    """One model's DELLA pruning of a tensor's vectors (`_magprune`): its stream of draws, its keep probabilities by
    rank (None where it keeps all, `keep`, or nothing) and the deltas it prunes in place (`target`), with the hooks
    a merge gives it: `make(a, z)` makes the range [a, z) of the target before it is ranked, `then(a, z)` takes it
    once pruned."""
    model: int
    uniform: Uniform
    by_rank: np.ndarray | None
    keep: bool
    target: torch.Tensor
    make: RangeWork | None = None
    then: RangeWork | None = None

    def part(self, a: int, z: int) -> Pruning:
        """The same over [a, z) of its target, the hooks' ranges moved to match."""
        return dataclasses.replace(self, target=self.target[a:z], make=_shifted(self.make, a),
                                   then=_shifted(self.then, a))


def _shifted(work: RangeWork | None, at: int) -> RangeWork | None:
    return (lambda a, z: work(at + a, at + z)) if work is not None else None


def _differences(x: np.ndarray, base: np.ndarray, out: np.ndarray) -> RangeWork:
    return lambda a, z: np.subtract(x[a:z], base[a:z], out=out[a:z])


def _magprune(start: int, ctx: ChunkContext, prunings: list[Pruning], unit: int, inner: int,
              done: RangeWork | None = None) -> None:
    """Prune (and rescale) each of `prunings`' targets in place, in turn: the same number of whole units, starting at
    element `start` of the tensor. The units are split between the merge's threads; each takes a batch of them at a
    time through every pruning (made, ranked, drawn, pruned, passed on) and then `done(a, z)`, while the batch is in
    its cache."""
    from streammerge.kernels import magprune  # (numba: imported by the merges that use it)
    span = unit // inner
    numel = prunings[0].target.numel()
    units = numel // unit
    if any(p.by_rank is not None for p in prunings):  # (else no scratch: a unit may be larger than it holds)
        keys, magnitude, draws = _magprune_scratch(ctx, numel)
        order = keys.reshape(units * inner, span)  # a row per ranked vector
    rescale = bool(ctx.params["rescale"])
    shift = magprune.position_bits(span)
    by_keys = _ranks_by_keys(prunings[0].target.dtype, span)  # (else float64: the order of a stable argsort)
    positions = (1 << shift) - 1 if by_keys else -1
    grids = [p.target.numpy().reshape(units, span, inner) for p in prunings]  # [units, ranked dimension, rest]
    step = max(1, RANKED_BATCH // unit)

    def prune(pruning: Pruning, grid: np.ndarray, u: int, z: int) -> None:
        a, b = u * unit, z * unit
        if pruning.make is not None:
            pruning.make(a, b)
        if pruning.by_rank is None:
            if not pruning.keep:
                grid[u:z] = 0
        else:
            pruning.uniform.fill(start + a, draws[a:b])
            rows = order[u * inner:z * inner]
            if by_keys:
                magprune.rank_keys(grid[u:z].view(np.int32), rows, shift)
                rows.sort(axis=-1)
            else:
                ranked = magnitude[a:b].view(z - u, inner, span)
                torch.abs(pruning.target[a:b].view(z - u, span, inner).transpose(1, 2), out=ranked)
                torch.argsort(ranked.view(-1, span), dim=1, stable=True, out=torch.from_numpy(rows))
            magprune.prune_ranked(grid[u:z], rows, positions, draws[a:b].reshape(z - u, span, inner),
                                  pruning.by_rank, rescale)
        if pruning.then is not None:
            pruning.then(a, b)

    def work(first: int, last: int) -> None:
        for u in range(first, last, step):
            z = min(last, u + step)
            for pruning, grid in zip(prunings, grids):
                prune(pruning, grid, u, z)
            if done is not None:
                done(u * unit, z * unit)

    in_parallel(units, work, grain=step)


def prune_by_magnitude_rank(ctx: ChunkContext, b: Buffers, models: list[int], inputs: list[torch.Tensor] | None = None,
                            targets: list[torch.Tensor] | None = None, thens: list[RangeWork] | None = None,
                            done: RangeWork | None = None) -> None:
    """DELLA: keep each entry with probability density +- epsilon by its magnitude's rank along dimension 1, for
    each of `models` in turn over each batch of whole units, in targets[k] (chunk-sized; b.delta for every model by
    default). With `inputs` (the chunks of `models`), a target's batch is made here, input - base; `thens[k](a, z)`
    takes each range of targets[k] once pruned, and `done(a, z)` each range once every model's is (on the merge's
    threads: each range once)."""
    n = b.delta.numel()
    unit, inner = _magprune_unit(ctx.shape, ctx.numel)
    span = unit // inner
    base = ctx.base.numpy()
    targets = targets or [b.delta] * len(models)
    prunings = []
    for k, i in enumerate(models):
        model = ctx.model_params[i]
        ranked = 0 < model["density"] < 1  # (else all kept, or none)
        by_rank = ((_probability_by_rank_cached if span <= CACHED_RANKS else _probability_by_rank)(
            span, model["density"], model["epsilon"], b.delta.dtype).numpy() if ranked else None)
        make = _differences(inputs[k].numpy(), base, targets[k].numpy()) if inputs is not None else None
        prunings.append(Pruning(i, Uniform(ctx.seed, ctx.name, i), by_rank, model["density"] > 0, targets[k], make,
                                thens[k] if thens is not None else None))
    # (float32 deltas ranked by sorting int64 keys need nothing else from the first buffer: twice as many; float64
    # deltas are ordered by torch's stable argsort, whose temporaries the buffers do not hold: half as many)
    share = (MAGPRUNE_SHARE // 2 if _ranks_by_keys(b.delta.dtype, span)
             else MAGPRUNE_SHARE * (2 if b.delta.dtype == torch.float64 else 1))
    capacity = ctx.buffers[0].numel() // share
    if unit > capacity and any(p.by_rank is not None for p in prunings):
        raise StreamMergeError(
            f"della ranks the magnitudes of '{ctx.name}' in units of {unit} elements, more than its working "
            f"memory holds ({capacity}); raise max_ram (about {share * unit * 40 // 2**20 + 64} MiB "
            "would do).")
    start, stop = ctx.offset, ctx.offset + n
    # Units straddling the chunk's edges are read whole and ranked; only this chunk's part is kept.
    edges = {start // unit * unit if start % unit else None, stop // unit * unit if stop % unit else None}
    for unit_start in sorted(u for u in edges if u is not None):
        unit_stop = unit_start + unit
        a, z = max(unit_start, start), min(unit_stop, stop)
        for p in prunings:
            whole = ctx.read_input(p.model, unit_start, unit_stop).sub_(ctx.read_base(unit_start, unit_stop))
            _magprune(unit_start, ctx, [dataclasses.replace(p, target=whole, make=None, then=None)], unit, inner)
            p.target[a - start:z - start].copy_(whole[a - unit_start:z - unit_start])
            if p.then is not None:
                p.then(a - start, z - start)
        if done is not None:
            done(a - start, z - start)
    first_full, last_full = -(-start // unit) * unit, stop // unit * unit
    batch = max(unit, capacity // unit * unit)
    for a in range(first_full, last_full, batch):
        z = min(last_full, a + batch)
        at = a - start  # (the hooks take ranges of the batch's units: shifted to the chunk's)
        _magprune(a, ctx, [p.part(at, z - start) for p in prunings], unit, inner, done=_shifted(done, at))
