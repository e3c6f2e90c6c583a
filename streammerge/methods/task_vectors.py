"""Task-vector methods: merge the differences ("task vectors") between each model and a base.

    delta_i  = sparsify(model_i - base) * weight_i
    mixed    = sum_i delta_i                       (or, with sign consensus, only the deltas that agree with the
                                                    sign of sum_i delta_i, per element: TIES' "elect")
    mixed   /= sum of the weights that contributed  (when `normalize`)
    result   = base + lambda * mixed

The sparsifiers (none, magnitude, outliers, random, magprune) are in `sparsifiers`.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

import numpy as np
import torch

from streammerge.methods.method import ChunkContext, Method, Param, kernel_loader
from streammerge.methods.sparsifiers import (MAGPRUNE_BUFFERS, Buffers, MagnitudeStats, Sparsifier,
                                             add_randomly_pruned_segments, magnitude_finish, magnitude_observe,
                                             magnitude_passes, magnitude_segment_stats, magnitude_streamed_reads,
                                             merged_within_bounds, prune_by_magnitude_rank,
                                             prune_segments_by_magnitude, randomly_pruned_step, weight_divisor)
from streammerge.methods.streaming import DRAW_GRAIN, KERNEL_GRAIN, RangeWork, in_parallel, range_step


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


class Consensus(enum.Enum):
    NONE = "none"  # add every (sparsified) task vector
    SIGN = "sign"  # TIES: per element, only the entries whose sign agrees with that of their sum


@dataclass(frozen=True)
class Family:
    name: str
    help: str
    sparsifier: Sparsifier
    consensus: Consensus = Consensus.NONE
    normalize: bool = False  # default of the `normalize` parameter
    rescale: bool = False  # default of the `rescale` parameter
    typical: dict | None = None  # Method.typical

    @property
    def buffers(self) -> int:
        own = Buffers.MIN_BUFFERS + (3 if self.consensus is Consensus.SIGN else 0)
        return own + (MAGPRUNE_BUFFERS if self.sparsifier is Sparsifier.MAGPRUNE else 0)


def task_vector_merge(family: Family):
    def merge(ctx: ChunkContext, stats) -> torch.Tensor:
        consensus = family.consensus is Consensus.SIGN
        # one compiled pass over every model (without a sparsifier: every delta kept, where torch took three passes
        # per model and three more)
        if (family.sparsifier.by_magnitude or family.sparsifier is Sparsifier.NONE) and not ctx.segments:
            if stats is not None and ctx.offset == 0:  # (the merge's gates count the elements from the start)
                stats.merge_gates = [bd.new_gates() if bd is not None else [] for bd in stats.bounds]
            in_parallel(ctx.out.numel(), merged_within_bounds(ctx, stats, family.sparsifier, ctx.out, consensus),
                        grain=KERNEL_GRAIN)
            return ctx.out
        b = ctx.derived(Buffers)
        if consensus:  # (numba: imported by the merges that elect signs, not by every command)
            from streammerge.kernels.consensus import add_by_sign
        base = ctx.base
        mixed = ctx.out
        sums = (mixed, *b.rest[:3]) if consensus else (mixed,)  # (TIES': positive, negative and their weights)
        if family.sparsifier is Sparsifier.MAGPRUNE and not ctx.segments:
            # each batch of whole rows made and pruned for every model in turn, then merged, while it is in the
            # thread's cache: each model's deltas in a buffer of its own (the output's and those the sparsifiers by
            # magnitude and the sums use elsewhere) and summed in registers, or where the models outnumber them,
            # weighted and added to the sums one model at a time
            models = list(range(len(ctx.inputs)))
            own = [mixed, *(buffer[:mixed.numel()] for buffer in ctx.buffers[:-MAGPRUNE_BUFFERS])]
            if len(models) <= len(own):
                prune_by_magnitude_rank(ctx, b, models, ctx.inputs, own[:len(models)],
                                        done=deltas_merger(ctx, own[:len(models)], consensus))
            else:
                thens = [weighted_adder(b.delta, sums, m["weight"], i == 0, consensus)
                         for i, m in enumerate(ctx.model_params)]
                prune_by_magnitude_rank(ctx, b, models, ctx.inputs, thens=thens, done=finisher(ctx, sums, consensus))
            return mixed
        if not consensus and family.sparsifier is not Sparsifier.RANDOM:  # (else compiled steps: the first writes)
            mixed.zero_()
        # Compiled steps over element ranges, run together: each thread takes its range through every step in turn
        # (one dispatch, the range in its core's cache), before anything else reads or writes the sums.
        steps: list[RangeWork] = []
        grain = DRAW_GRAIN if family.sparsifier is Sparsifier.RANDOM else KERNEL_GRAIN

        def run_steps() -> None:
            if steps:
                in_parallel(mixed.numel(), lambda a, z: [step(a, z) for step in steps], grain=grain)
                steps.clear()

        for i, x in enumerate(ctx.inputs):
            weight, first = ctx.model_params[i]["weight"], i == 0
            # made, sparsified, weighted and added in one pass where the sparsifier allows it
            if family.sparsifier is Sparsifier.RANDOM:
                if ctx.segments:  # (each tensor of the run draws its own numbers)
                    add_randomly_pruned_segments(i, ctx, x, sums, weight, first)
                else:
                    steps.append(randomly_pruned_step(i, ctx, x, sums, weight, first))
                continue
            run_steps()  # (b.delta is made again below)
            torch.sub(x, base, out=b.delta)
            sparsify(family.sparsifier, i, ctx, stats, b)
            b.delta.mul_(weight)  # (torch's operations over the chunk: `weighted_adder` by range took longer here)
            if consensus:
                steps.append(range_step(add_by_sign, (b.delta, *sums), weight, first))
            else:
                mixed.add_(b.delta)
        steps.append(finisher(ctx, sums, consensus))
        run_steps()
        return mixed

    return merge


def deltas_merger(ctx: ChunkContext, deltas: list[torch.Tensor], consensus: bool) -> RangeWork:
    """For a range [a, z) of every model's (sparsified) deltas: the merge, as the sums and `finisher` make it, in
    one compiled pass (`consensus.merge_by_sign`, or `merge_sum` for the plain sum), written over the first model's
    (the chunk's output)."""
    from streammerge.kernels import consensus as kernels  # (numba: loaded by the merges that use it)
    arrays, base = [d.numpy() for d in deltas], ctx.base.numpy()
    weights = np.array([m["weight"] for m in ctx.model_params], dtype=base.dtype)
    normalize, scale = bool(ctx.params["normalize"]), float(ctx.params["lambda"])
    end = (normalize, scale) if consensus else (normalize, weight_divisor(ctx.model_params), scale)
    kernel = kernels.merge_by_sign if consensus else kernels.merge_sum
    return lambda a, z: kernel(tuple(x[a:z] for x in arrays), weights, base[a:z], *end)


def finisher(ctx: ChunkContext, sums: tuple[torch.Tensor, ...], consensus: bool) -> RangeWork:
    """The end of a task-vector merge over a range [a, z) of its sums, written over the first (the chunk's
    output): with `consensus`, the election, its normalisation, lambda and the base's addition in one compiled
    pass; else the total divided by the weights' sum with `normalize`, times lambda where that is not 1, plus the
    base (torch's operations on the whole chunk, in numpy on the range: both round the numbers to the sums' dtype)."""
    normalize, scale = bool(ctx.params["normalize"]), float(ctx.params["lambda"])
    if consensus:
        from streammerge.kernels.consensus import finish  # (numba: loaded by the merges that elect signs)
        return range_step(finish, (*sums, ctx.base), normalize, scale)
    total, base = sums[0].numpy(), ctx.base.numpy()
    divisor, factor = (total.dtype.type(v) for v in (weight_divisor(ctx.model_params), scale))

    def finish_total(a: int, z: int) -> None:
        part = total[a:z]
        if normalize:
            np.divide(part, divisor, out=part)
        if scale != 1:
            np.multiply(part, factor, out=part)
        np.add(base[a:z], part, out=part)

    return finish_total


def weighted_adder(delta: torch.Tensor, sums: tuple[torch.Tensor, ...], weight: float, first: bool,
                   consensus: bool) -> RangeWork:
    """For a range [a, z) of `delta` (a model's pruned task vector): delta *= weight, then added to `sums` (by sign
    with `consensus`, to +0 for the `first` model; else to the total): as a merge's step does over the chunk."""
    if consensus:
        from streammerge.kernels.consensus import add_by_sign  # (numba: loaded by the merges that elect signs)
    arrays = [t.numpy() for t in (delta, *sums)]
    scale = arrays[0].dtype.type(weight)  # (rounded to the buffers' dtype, as torch rounds a Python number)
    zero = arrays[0].dtype.type(0)

    def add(a: int, z: int) -> None:
        part = np.multiply(arrays[0][a:z], scale, out=arrays[0][a:z])
        if consensus:
            add_by_sign(part, *(s[a:z] for s in arrays[1:]), weight, first)
        else:  # (the first to +0, which turns -0 into +0, as adding to zeroed sums does)
            np.add(zero if first else arrays[1][a:z], part, out=arrays[1][a:z])

    return add


def _loader(family: Family):
    """`Method.load` of a family: loads the compiled kernels (`streammerge.kernels`) its merge runs on, if any."""
    kernels = ((["philox"] if family.sparsifier in (Sparsifier.RANDOM, Sparsifier.MAGPRUNE) else [])
               + (["dare"] if family.sparsifier is Sparsifier.RANDOM else [])
               + (["brackets", "magnitude"] if family.sparsifier.by_magnitude else [])
               + (["magnitude"] if family.sparsifier is Sparsifier.NONE else [])
               + (["magprune"] if family.sparsifier is Sparsifier.MAGPRUNE else [])
               + (["consensus"] if family.consensus is Consensus.SIGN or family.sparsifier is Sparsifier.MAGPRUNE
                  else []))
    return kernel_loader(*kernels) if kernels else None


def sparsify(sparsifier: Sparsifier, i: int, ctx: ChunkContext, stats, b: Buffers) -> None:
    """Sparsify model i's task vector in `b.delta` (rescaled where the method asks), in a run of small tensors
    (`ctx.segments`, `stats` one per tensor): each tensor on its segment with its own statistics. (A tensor merged
    alone is sparsified inside the compiled merge by magnitude, `merged_within_bounds`, and by DELLA's batches as the
    merge adds them, `prune_by_magnitude_rank`'s hooks.)"""
    if sparsifier.by_magnitude:
        prune_segments_by_magnitude(sparsifier, i, ctx, stats, b)
    elif sparsifier is Sparsifier.MAGPRUNE:
        for segment in ctx.segments:  # each tensor's rows ranked on its own, with the run's whole scratch buffers
            part = ctx.segment(segment)
            prune_by_magnitude_rank(dataclasses.replace(part, buffers=ctx.buffers), part.derived(Buffers), [i])


def _della_check(params: dict, model_params: list[dict]) -> str | None:
    for i, m in enumerate(model_params):
        d, e = m["density"], m["epsilon"]
        if 0 < d < 1 and not (d - e > 0 and d + e < 1):
            return (f"models[{i}]: della needs density - epsilon > 0 and density + epsilon < 1 "
                    f"(density {d}, epsilon {e}); lower epsilon")
    return None


FAMILIES = [
    Family("task_arithmetic", "base + lambda * sum of weighted task vectors (Ilharco et al. 2022)",
           Sparsifier.NONE),
    Family("ties", "TIES: keep the top `density` of each task vector by magnitude, elect signs, average agreeing "
           "entries", Sparsifier.MAGNITUDE, Consensus.SIGN, normalize=True, typical={"model": {"density": 0.5}}),
    Family("dare_linear", "DARE: keep each task-vector entry with probability `density`, rescaled by 1/density, "
           "then add", Sparsifier.RANDOM, rescale=True, typical={"model": {"density": 0.5}}),
    Family("dare_ties", "DARE pruning with TIES sign consensus", Sparsifier.RANDOM, Consensus.SIGN, rescale=True,
           typical={"model": {"density": 0.5}}),
    Family("breadcrumbs", "Model Breadcrumbs: drop the largest `gamma` and smallest entries, keep `density` of "
           "each task vector", Sparsifier.OUTLIERS, typical={"model": {"density": 0.9, "gamma": 0.01}}),
    Family("breadcrumbs_ties", "Model Breadcrumbs pruning with TIES sign consensus", Sparsifier.OUTLIERS,
           Consensus.SIGN, typical={"model": {"density": 0.9, "gamma": 0.01}}),
    Family("della", "DELLA: keep probability density +- epsilon by magnitude rank within rows, rescale by 1/p, "
           "TIES consensus", Sparsifier.MAGPRUNE, Consensus.SIGN, normalize=True, rescale=True,
           typical={"model": {"density": 0.5, "epsilon": 0.1}}),
    Family("della_linear", "DELLA pruning without sign consensus", Sparsifier.MAGPRUNE, rescale=True,
           typical={"model": {"density": 0.5, "epsilon": 0.1}}),
]


def _params(family: Family) -> tuple[Param, ...]:
    sparsifier = family.sparsifier
    params = [WEIGHT]
    if sparsifier is not Sparsifier.NONE:
        params.append(DENSITY)
    if sparsifier is Sparsifier.OUTLIERS:
        params.append(GAMMA)
    if sparsifier is Sparsifier.MAGPRUNE:
        params.append(EPSILON)
    params += [LAMBDA, Param("normalize", family.normalize, "divide by the sum of the weights that contributed",
                             kind=bool)]
    if sparsifier is not Sparsifier.NONE:
        what = "1/keep-probability" if sparsifier.random else "the ratio of L1 norms before and after pruning"
        params.append(Param("rescale", family.rescale, f"rescale kept entries by {what}", kind=bool))
    params.append(INT8_MASK)
    return tuple(params)


def _method(family: Family) -> Method:
    magnitude = family.sparsifier.by_magnitude

    def passes(params: dict, model_params: list[dict], dtype: torch.dtype, numel: int, shape: tuple) -> int:
        return magnitude_passes(family.sparsifier, params, model_params, dtype, numel)

    return Method(
        name=family.name,
        help=family.help,
        merge=task_vector_merge(family),
        params=_params(family),
        needs_base=True,
        stat_passes=passes if magnitude else 0,
        init_stats=(lambda numel, n: MagnitudeStats()) if magnitude else None,
        observe=magnitude_observe(family.sparsifier) if magnitude else None,
        finish_pass=magnitude_finish if magnitude else None,
        streamed_reads=magnitude_streamed_reads(family.sparsifier) if magnitude else None,
        buffers=family.buffers,
        check=_della_check if family.sparsifier is Sparsifier.MAGPRUNE else None,
        # magprune ranks whole rows, which tiles would cut (each cut row read again): its chunks stay whole
        tiled=family.sparsifier is not Sparsifier.MAGPRUNE,
        # without a sparsifier, each entry depends on the same entry of the inputs alone; with one, only the
        # sparsifier's selection or draws depend on the tensor
        elementwise=family.sparsifier is Sparsifier.NONE,
        segmented=family.sparsifier is not Sparsifier.NONE,
        segment_stats=magnitude_segment_stats(family.sparsifier) if magnitude else None,
        load=_loader(family),
        own_threads=family.sparsifier in (Sparsifier.RANDOM, Sparsifier.MAGPRUNE),  # (the draws, DELLA's sorts)
        typical=family.typical or {},
    )


METHODS = tuple(_method(family) for family in FAMILIES)
