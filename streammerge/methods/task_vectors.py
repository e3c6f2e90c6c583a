"""Task-vector methods: merge the differences ("task vectors") between each model and a base.

    delta_i  = sparsify(model_i - base) * weight_i
    mixed    = sum_i delta_i                       (or, with sign consensus, only the deltas that agree with the
                                                    sign of sum_i delta_i, per element: TIES' "elect")
    mixed   /= sum of the weights that contributed  (when `normalize`)
    result   = base + lambda * mixed

Sparsifiers: none (task arithmetic), magnitude (TIES: keep the `density` fraction of largest |delta| over the
whole tensor), outliers (Model Breadcrumbs: also drop the `gamma` fraction of largest), random (DARE: keep each
element with probability `density`), magprune (DELLA: keep probability rising with the magnitude's rank in its
row, density +- epsilon). The exact whole-tensor thresholds come from streaming radix selection; random draws
come from per-block generators; so the result does not depend on the chunk size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from streammerge.errors import StreamMergeError
from streammerge.methods import ChunkContext, Method, Param, register
from streammerge.methods.streaming import Groups, GroupSums, RankSelect, TieGate, Uniform, bool_views

RESCALE_EPS = 1e-7  # below this L1 norm a magnitude-pruned delta is left unscaled
MAGPRUNE_SHARE = 8  # DELLA ranks at most 1/8 of a chunk at once (its temporaries take ~32 bytes per element)


def _unit_interval(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be between 0 and 1"


WEIGHT = Param("weight", 1.0, "this model's weight (scales its task vector)", per_model=True)
DENSITY = Param("density", 1.0, "fraction of this model's task vector to keep", per_model=True,
                check=_unit_interval)
GAMMA = Param("gamma", 0.01, "fraction of the largest-magnitude task-vector entries to drop as outliers",
              per_model=True, check=_unit_interval)
EPSILON = Param("epsilon", 0.15, "keep probabilities range over density +- epsilon by magnitude rank",
                per_model=True, check=lambda v: None if 0.0 <= v < 0.5 else "must be at least 0 and below 0.5")
LAMBDA = Param("lambda", 1.0, "scale of the merged task vector")
INT8_MASK = Param("int8_mask", False, "accepted for mergekit configs; masks here take no extra memory either way",
                  kind=bool)


# -- which elements a magnitude sparsifier keeps -------------------------------------------------------------
KEEP_ALL, DROP_ALL = "all", "none"


def magnitude_ranks(kind: str, model: dict, numel: int):
    """KEEP_ALL, DROP_ALL, or the ascending ranks (first kept, last kept or None for the largest) of a magnitude
    sparsifier, in the order (|delta|, position)."""
    density = model["density"]
    if density >= 1:
        return KEEP_ALL
    if kind == "magnitude":
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
    """The kept magnitudes: (low, high) exclusive, plus elements equal to a bound admitted by position."""

    low: float
    high: float | None
    gates: list[tuple[float, int, int]]  # (value, first, stop) positions among the equal elements

    def new_gates(self) -> list[TieGate]:
        return [TieGate(*g) for g in self.gates]


def bounds_from(select: RankSelect, has_high: bool) -> Bounds:
    low, low_before = select.value(0), select.ties_before(0)
    if not has_high:
        gates = [(low, low_before, select.count_equal[0])] if low > 0 else []
        return Bounds(low, None, gates)
    high, high_before = select.value(1), select.ties_before(1)
    if high == low:
        gates = [(low, low_before, high_before + 1)] if low > 0 else []
    else:
        gates = ([(low, low_before, select.count_equal[0])] if low > 0 else []) + \
                ([(high, 0, high_before + 1)] if high > 0 else [])
    return Bounds(low, high, gates)


class MagnitudeStats:
    """Per model: the radix selection of its thresholds, then (with `rescale`) the L1 norms before and after."""

    def __init__(self):
        self.ready = False

    def setup(self, kind: str, ctx: ChunkContext, dtype: torch.dtype) -> None:
        self.kind = kind
        self.ranks = [magnitude_ranks(kind, m, ctx.numel) for m in ctx.model_params]
        self.selects = [RankSelect([r[0]] + ([r[1]] if r[1] is not None else []), dtype)
                        if isinstance(r, tuple) else None for r in self.ranks]
        self.select_passes = RankSelect([0], dtype).passes
        self.rescale = ctx.params.get("rescale", False)
        self.bounds: list[Bounds | None] = [None] * len(self.ranks)
        self.norms = GroupSums(Groups("tensor", ctx.shape), 2 * len(self.ranks))  # (all, kept) per model
        self.factors = [1.0] * len(self.ranks)
        self.merge_gates = None
        self.ready = True


def magnitude_passes(params: dict, model_params: list[dict], dtype: torch.dtype, kind: str, numel: int) -> int:
    if not any(isinstance(magnitude_ranks(kind, m, numel), tuple) for m in model_params):
        return 0
    return RankSelect([0], dtype).passes + (1 if params.get("rescale") else 0)


# -- the method family ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    name: str
    sparsifier: str | None  # None, "magnitude", "outliers", "random", "magprune"
    consensus: bool
    normalize: bool
    rescale: bool


class Buffers:
    """Names for the method's scratch buffers within one chunk."""

    def __init__(self, ctx: ChunkContext, consensus: bool):
        n = ctx.out.numel()
        scratch = [b[:n] for b in ctx.scratch]
        self.delta, self.magnitude, counts, masks = scratch[:4]
        self.counts = counts.view({4: torch.int32, 8: torch.int64}[counts.element_size()])
        self.keep, self.equal, self.other, self.flag = bool_views(masks, n)[:4]
        if consensus:
            self.negative, self.weight_pos, self.weight_neg = scratch[4:7]


def _sparsify_magnitude(family: Family, i: int, ctx: ChunkContext, stats: MagnitudeStats, b: Buffers,
                        gates: list[TieGate] | None) -> None:
    """Zero the entries of b.delta outside model i's kept magnitude range (b.magnitude gets |delta|)."""
    ranks = magnitude_ranks(family.sparsifier, ctx.model_params[i], ctx.numel)
    if ranks == KEEP_ALL:
        return
    if ranks == DROP_ALL:
        b.delta.zero_()
        return
    bounds = stats.bounds[i]
    torch.abs(b.delta, out=b.magnitude)
    torch.gt(b.magnitude, bounds.low, out=b.keep)
    if bounds.high is not None:
        torch.lt(b.magnitude, bounds.high, out=b.other)
        b.keep.logical_and_(b.other)
    for gate in gates:
        gate.apply(b.magnitude, b.keep, b.equal, b.counts, b.other)
    torch.logical_not(b.keep, out=b.other)
    b.delta.masked_fill_(b.other, 0)


def _sparsify_random(family: Family, i: int, ctx: ChunkContext, b: Buffers) -> None:
    density = ctx.model_params[i]["density"]
    if density >= 1:
        return
    if density <= 0:
        b.delta.zero_()
        return
    Uniform(ctx.seed, ctx.name, i).fill(ctx.offset, b.magnitude)
    torch.ge(b.magnitude, density, out=b.other)  # dropped: u >= density, so P(keep) = density
    b.delta.masked_fill_(b.other, 0)
    if ctx.params["rescale"]:
        b.delta.div_(density)


def _magprune_unit(shape: tuple, numel: int) -> tuple[int, int]:
    """DELLA ranks magnitudes along dimension 1: the contiguous unit holding whole such vectors (a row of a
    matrix, a [dim1, rest] slab of a larger tensor, all of a 1-D tensor) and the size of `rest`."""
    if len(shape) < 2:
        return max(numel, 1), 1
    return math.prod(shape[1:]), math.prod(shape[2:])


def _magprune(delta: torch.Tensor, start: int, ctx: ChunkContext, i: int, unit: int, inner: int,
              out: torch.Tensor, uniform: Uniform) -> None:
    """Prune (and rescale) `delta`, whole units starting at element `start` of the tensor, into `out`."""
    model = ctx.model_params[i]
    density, epsilon = model["density"], model["epsilon"]
    grid = delta.view(-1, unit // inner, inner)  # [units, ranked dimension, rest]
    order = torch.argsort(grid.abs(), dim=1, stable=True)
    span = grid.shape[1]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(span).view(1, -1, 1).expand_as(order))
    del order
    rank_norm = ranks.to(delta.dtype).div_(span - 1) if span > 1 else torch.zeros(grid.shape, dtype=delta.dtype)
    del ranks
    probability = rank_norm.mul_(2 * epsilon).add_(density - epsilon).view(-1)
    draws = uniform.fill(start, torch.empty(delta.numel(), dtype=torch.float32)).to(delta.dtype)
    kept = torch.where(draws < probability, delta, torch.zeros((), dtype=delta.dtype))
    if ctx.params["rescale"]:
        kept.div_(probability)
    out.copy_(kept)


def _sparsify_magprune(family: Family, i: int, ctx: ChunkContext, b: Buffers) -> None:
    model = ctx.model_params[i]
    if model["density"] >= 1:
        return
    if model["density"] <= 0:
        b.delta.zero_()
        return
    unit, inner = _magprune_unit(ctx.shape, ctx.numel)
    capacity = ctx.scratch[0].numel() // MAGPRUNE_SHARE
    if unit > capacity:
        raise StreamMergeError(
            f"della ranks the magnitudes of '{ctx.name}' in units of {unit} elements, more than its working "
            f"memory holds ({capacity}); raise max_ram (about {MAGPRUNE_SHARE * unit * 40 // 2**20 + 64} MiB "
            "would do).")
    uniform = Uniform(ctx.seed, ctx.name, i)
    start, stop = ctx.offset, ctx.offset + b.delta.numel()
    # Units straddling the chunk's edges are read whole and ranked; only this chunk's part is kept.
    edges = {start // unit * unit if start % unit else None, stop // unit * unit if stop % unit else None}
    for unit_start in sorted(u for u in edges if u is not None):
        unit_stop = unit_start + unit
        whole = ctx.read(i, unit_start, unit_stop).sub_(ctx.read(len(ctx.inputs), unit_start, unit_stop))
        _magprune(whole, unit_start, ctx, i, unit, inner, whole, uniform)
        a, z = max(unit_start, start), min(unit_stop, stop)
        b.delta[a - start:z - start].copy_(whole[a - unit_start:z - unit_start])
    first_full, last_full = -(-start // unit) * unit, stop // unit * unit
    batch = max(unit, capacity // unit * unit)
    for a in range(first_full, last_full, batch):
        z = min(last_full, a + batch)
        part = b.delta[a - start:z - start]
        _magprune(part, a, ctx, i, unit, inner, part, uniform)


def task_vector_merge(family: Family):
    def merge(ctx: ChunkContext, stats) -> torch.Tensor:
        b = Buffers(ctx, family.consensus)
        base = ctx.base
        mixed = ctx.out.zero_()
        if family.consensus:
            b.negative.zero_(), b.weight_pos.zero_(), b.weight_neg.zero_()
        gates = None
        if family.sparsifier in ("magnitude", "outliers") and stats is not None:
            if ctx.offset == 0:
                stats.merge_gates = [bd.new_gates() if bd is not None else [] for bd in stats.bounds]
            gates = stats.merge_gates
        for i, x in enumerate(ctx.inputs):
            weight = ctx.model_params[i]["weight"]
            torch.sub(x, base, out=b.delta)
            if family.sparsifier in ("magnitude", "outliers"):
                _sparsify_magnitude(family, i, ctx, stats, b, gates[i] if gates else [])
                if stats is not None and stats.factors[i] != 1.0:
                    b.delta.mul_(stats.factors[i])
            elif family.sparsifier == "random":
                _sparsify_random(family, i, ctx, b)
            elif family.sparsifier == "magprune":
                _sparsify_magprune(family, i, ctx, b)
            b.delta.mul_(weight)
            if not family.consensus:
                mixed.add_(b.delta)
                continue
            torch.clamp(b.delta, min=0, out=b.magnitude)
            mixed.add_(b.magnitude)
            torch.clamp(b.delta, max=0, out=b.magnitude)
            b.negative.add_(b.magnitude)
            torch.gt(b.delta, 0, out=b.flag)
            b.weight_pos.add_(b.magnitude.copy_(b.flag).mul_(weight))
            torch.lt(b.delta, 0, out=b.flag)
            b.weight_neg.add_(b.magnitude.copy_(b.flag).mul_(weight))
        if family.consensus:
            torch.add(mixed, b.negative, out=b.magnitude)
            torch.ge(b.magnitude, 0, out=b.flag)  # the elected sign: + where the sum is >= 0
            torch.where(b.flag, mixed, b.negative, out=b.delta)
            torch.where(b.flag, b.weight_pos, b.weight_neg, out=b.magnitude)
            torch.eq(b.magnitude, 0, out=b.flag)
            b.magnitude.masked_fill_(b.flag, 1)
            mixed = b.delta
            if ctx.params["normalize"]:
                mixed.div_(b.magnitude)
        elif ctx.params["normalize"]:
            divisor = sum(m["weight"] for m in ctx.model_params)
            mixed.div_(divisor if abs(divisor) >= 1e-8 else 1.0)
        if ctx.params["lambda"] != 1:
            mixed.mul_(ctx.params["lambda"])
        return torch.add(base, mixed, out=ctx.out)

    return merge


# -- statistics passes for the magnitude sparsifiers ---------------------------------------------------------
def magnitude_observe(family: Family):
    def observe(stats: MagnitudeStats, pass_index: int, ctx: ChunkContext) -> None:
        if not stats.ready:
            stats.setup(family.sparsifier, ctx, ctx.out.dtype)
        b = Buffers(ctx, False)
        if pass_index < stats.select_passes:
            for i, select in enumerate(stats.selects):
                if select is None:
                    continue
                torch.sub(ctx.inputs[i], ctx.base, out=b.magnitude).abs_()
                select.observe(pass_index, b.magnitude, b.counts, b.keep)
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
            _sparsify_magnitude(family, i, ctx, stats, b, stats.rescale_gates[i])
            stats.norms.add(2 * i + 1, ctx.offset, b.delta.abs_())

    return observe


def magnitude_finish(stats: MagnitudeStats, pass_index: int) -> None:
    if pass_index < stats.select_passes:
        for i, select in enumerate(stats.selects):
            if select is not None:
                select.finish_pass(pass_index)
                if pass_index == stats.select_passes - 1:
                    stats.bounds[i] = bounds_from(select, stats.ranks[i][1] is not None)
        return
    for i, select in enumerate(stats.selects):
        if select is None:
            continue
        before, after = stats.norms.sums[2 * i, 0].item(), stats.norms.sums[2 * i + 1, 0].item()
        stats.factors[i] = before / after if before >= RESCALE_EPS and after >= RESCALE_EPS else 1.0


def _della_check(params: dict, model_params: list[dict]) -> str | None:
    for i, m in enumerate(model_params):
        d, e = m["density"], m["epsilon"]
        if 0 < d < 1 and not (d - e > 0 and d + e < 1):
            return (f"models[{i}]: della needs density - epsilon > 0 and density + epsilon < 1 "
                    f"(density {d}, epsilon {e}); lower epsilon")
    return None


FAMILIES = [
    (Family("task_arithmetic", None, False, False, False),
     "base + lambda * sum of weighted task vectors (Ilharco et al. 2022)"),
    (Family("ties", "magnitude", True, True, False),
     "TIES: keep the top `density` of each task vector by magnitude, elect signs, average agreeing entries"),
    (Family("dare_linear", "random", False, False, True),
     "DARE: keep each task-vector entry with probability `density`, rescaled by 1/density, then add"),
    (Family("dare_ties", "random", True, False, True),
     "DARE pruning with TIES sign consensus"),
    (Family("breadcrumbs", "outliers", False, False, False),
     "Model Breadcrumbs: drop the largest `gamma` and smallest entries, keep `density` of each task vector"),
    (Family("breadcrumbs_ties", "outliers", True, False, False),
     "Model Breadcrumbs pruning with TIES sign consensus"),
    (Family("della", "magprune", True, True, True),
     "DELLA: keep probability density +- epsilon by magnitude rank within rows, rescale by 1/p, TIES consensus"),
    (Family("della_linear", "magprune", False, False, True),
     "DELLA pruning without sign consensus"),
]


def _register(family: Family, help_text: str) -> None:
    params = [WEIGHT]
    if family.sparsifier:
        params.append(DENSITY)
    if family.sparsifier == "outliers":
        params.append(GAMMA)
    if family.sparsifier == "magprune":
        params.append(EPSILON)
    params += [LAMBDA, Param("normalize", family.normalize, "divide by the sum of the weights that contributed",
                             kind=bool)]
    if family.sparsifier:
        what = ("1/keep-probability" if family.sparsifier in ("random", "magprune")
                else "the ratio of L1 norms before and after pruning")
        params.append(Param("rescale", family.rescale, f"rescale kept entries by {what}", kind=bool))
    params.append(INT8_MASK)
    magnitude = family.sparsifier in ("magnitude", "outliers")
    extra = 7 if family.consensus else 4
    if family.sparsifier == "magprune":
        extra += 2  # ranking temporaries, batched to a quarter of a chunk of int64 pairs
    register(Method(
        name=family.name,
        help=help_text,
        merge=task_vector_merge(family),
        params=tuple(params),
        needs_base=True,
        stat_passes=(_passes_for(family.sparsifier) if magnitude else 0),
        init_stats=(lambda numel, n: MagnitudeStats()) if magnitude else None,
        observe=magnitude_observe(family) if magnitude else None,
        finish_pass=magnitude_finish if magnitude else None,
        extra_buffers=extra,
        check=_della_check if family.sparsifier == "magprune" else None,
    ))


def _passes_for(kind: str) -> Callable:
    def passes(params: dict, model_params: list[dict], dtype: torch.dtype, numel: int) -> int:
        return magnitude_passes(params, model_params, dtype, kind, numel)
    return passes


for _family, _help in FAMILIES:
    _register(_family, _help)
