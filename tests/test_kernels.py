"""The compiled kernels against the torch and numpy operations they replace: the same bits, edge values included
(the merges that run them are held to their references in `test_methods.py` and `test_tiles.py`)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from streammerge.kernels import dare, fusion, magnitude, magprune, ram, sce, stock
from streammerge.kernels.brackets import bracket_slice
from streammerge.kernels.consensus import add_by_sign, finish, merge_by_sign, merge_sum
from streammerge.methods import streaming
from streammerge.methods.masks import INT_VIEW, compare, keep_only
from streammerge.methods.streaming import GRID, Groups, GroupSums, Uniform


def by_operations(deltas: list[torch.Tensor], weights: list[float], base: torch.Tensor, normalize: bool,
                  scale: float) -> torch.Tensor:
    """Sign consensus as element-wise torch and numpy operations, as `task_vector_merge` ran them: the elected
    sign's sum, divided by its weight (1 where that is 0) with `normalize`, times `scale` unless 1, plus the base."""
    n, dtype = deltas[0].numel(), deltas[0].dtype
    positive, negative, weight_pos, weight_neg, scratch = (torch.zeros(n, dtype=dtype) for _ in range(5))
    for delta, weight in zip(deltas, weights):
        positive.add_(torch.clamp(delta, min=0, out=scratch))
        negative.add_(torch.clamp(delta, max=0, out=scratch))
        weight_pos.add_(torch.gt(delta, 0, out=scratch), alpha=weight)
        weight_neg.add_(torch.lt(delta, 0, out=scratch), alpha=weight)
    up = torch.empty(n, dtype=torch.bool)
    compare(np.greater_equal, torch.add(positive, negative), 0, up)
    weight = torch.where(up, weight_pos, weight_neg)
    mixed = torch.where(up, positive, negative)
    if normalize:
        mixed.div_(weight.masked_fill_(weight == 0, 1))
    if scale != 1:
        mixed.mul_(scale)
    return torch.add(base, mixed)


def edge_values(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=generator, dtype=torch.float64).to(dtype)
    specials = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45], dtype=dtype)
    picks = torch.randint(0, 4 * len(specials), (n,), generator=generator)
    where = picks < len(specials)
    values[where] = specials[picks[where]]
    return values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1.0, -0.7], [0.1, 0.1, 0.1, 0.1, -0.4], [0.3]])
@pytest.mark.parametrize("normalize, scale", [(True, 1.0), (False, 1.0), (True, 0.7), (False, -1.3)])
def test_consensus_kernels_give_the_bits_of_the_operations(dtype, weights, normalize, scale):
    """Each model's step added by sign (the first to sums it does not read: they start as garbage here), then
    the election and the rest in one pass, written over the positive sum."""
    n = 50_000
    deltas = [edge_values(n, dtype, seed) for seed in range(len(weights))]
    deltas.append(deltas[0].neg())  # sums that cancel exactly
    weights = weights + [weights[0]]
    base = edge_values(n, dtype, 99)
    expected = by_operations(deltas, weights, base, normalize, scale)
    sums = [edge_values(n, dtype, 100 + k) for k in range(4)]
    for k, (delta, w) in enumerate(zip(deltas, weights)):
        add_by_sign(delta.numpy(), *(s.numpy() for s in sums), w, k == 0)
    finish(*(s.numpy() for s in sums), base.numpy(), normalize, scale)
    bits = INT_VIEW[dtype]
    assert torch.equal(sums[0].view(bits), expected.view(bits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1.0, -0.7], [0.1, 0.1, 0.1, 0.1, -0.4], [0.3]])
@pytest.mark.parametrize("normalize, scale", [(True, 1.0), (False, 1.0), (True, 0.7), (False, -1.3)])
def test_merges_of_every_models_deltas_give_the_bits_of_the_operations(dtype, weights, normalize, scale):
    """Every model's deltas at once, written over the first: each weighted (torch's multiplication), then added by
    sign and elected as the operations above do, or summed from +0, divided, scaled and added to the base (a NaN
    for a NaN: see `same_bits_or_both_nan`)."""
    n = 50_000
    deltas = [edge_values(n, dtype, seed) for seed in range(len(weights))]
    deltas.append(deltas[0].clone())  # with the negated weight: sums that cancel exactly
    weights = weights + [-weights[0]]
    base = edge_values(n, dtype, 99)
    weighted = [torch.mul(d, w) for d, w in zip(deltas, weights)]
    given = np.array(weights, dtype=base.numpy().dtype)
    bits = INT_VIEW[dtype]
    got = [d.clone() for d in deltas]
    merge_by_sign(tuple(d.numpy() for d in got), given, base.numpy(), normalize, scale)
    assert torch.equal(got[0].view(bits), by_operations(weighted, weights, base, normalize, scale).view(bits))
    total = torch.zeros(n, dtype=dtype)
    for w in weighted:
        total.add_(w)
    if normalize:
        total.div_(0.9)
    if scale != 1:
        total.mul_(scale)
    got = [d.clone() for d in deltas]
    merge_sum(tuple(d.numpy() for d in got), given, base.numpy(), normalize, 0.9, scale)
    assert same_bits_or_both_nan(got[0], torch.add(base, total))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1.0, -0.7], [0.1, 0.1, 0.1, 0.1, -0.4], [0.3]])
@pytest.mark.parametrize("normalize, scale", [(True, 1.0), (False, 1.0), (True, 0.7), (False, -1.3)])
def test_task_vector_merge_without_a_sparsifier_gives_the_bits_of_the_operations(dtype, weights, normalize, scale):
    """task_arithmetic's compiled pass (`magnitude.merge_within` with every delta kept, none rescaled) against the
    operations it replaced: each model's input minus the base (torch), times its weight, added in model order to +0;
    the total divided by the weights' sum with `normalize`, times `scale` unless 1 (numpy, in the values' dtype),
    plus the base. Inputs and base hold zeros of both signs, NaN, infinities and subnormals; one input repeats the
    first with the opposite weight (sums that cancel exactly)."""
    n = 50_000
    inputs = [edge_values(n, dtype, seed) for seed in range(len(weights))]
    inputs.append(inputs[0].clone())
    weights = weights + [-weights[0]]
    base = edge_values(n, dtype, 99)
    divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
    total = torch.zeros(n, dtype=dtype)
    for x, w in zip(inputs, weights):
        total.add_(torch.sub(x, base).mul_(w))
    part = total.numpy()
    if normalize:
        np.divide(part, part.dtype.type(divisor), out=part)
    if scale != 1:
        np.multiply(part, part.dtype.type(scale), out=part)
    np.add(base.numpy(), part, out=part)
    got = torch.full((n,), 7.0, dtype=dtype)
    numbers = np.dtype(base.numpy().dtype)
    unbounded, ones = np.zeros(len(inputs), dtype=numbers), np.ones(len(inputs), dtype=numbers)
    magnitude.merge_within(tuple(x.numpy() for x in inputs), base.numpy(), unbounded, unbounded,
                           np.ones(len(inputs), dtype=np.bool_), ones, np.array(weights, dtype=numbers), got.numpy(),
                           normalize, divisor, scale)
    assert same_bits_or_both_nan(got, total)


@pytest.mark.parametrize("span", [1, 2, 3, 1000, 3001])
@pytest.mark.parametrize("rest", [1, 3])
def test_della_keys_sort_as_a_stable_argsort(span, rest):
    """Sorted keys order each vector along dimension 1 like a stable argsort of the magnitudes: equal magnitudes
    (+0 and -0 among them) by position, +Inf above every number and every NaN (whatever its sign and payload)
    above +Inf, equal to each other."""
    g = torch.Generator().manual_seed(span)
    values = (torch.randint(-4, 5, (8, span, rest), generator=g) / 4).float()  # many ties
    values[1::2] = torch.randn(4, span, rest, generator=g)
    nans = torch.tensor([0x7FC00000, 0x7F800001, 0x7FFFFFFF, -0x7FC00123 - 1], dtype=torch.int32).view(torch.float32)
    specials = torch.cat([nans, torch.tensor([math.inf, -math.inf, 0.0, -0.0, 3.0e38, 1e-45, -1e-45])])
    for unit in range(0, 8, 3):
        values[unit, torch.randint(0, span, (len(specials),), generator=g), 0] = specials
    keys = np.empty((8 * rest, span), dtype=np.int64)
    shift = magprune.position_bits(span)
    magprune.rank_keys(values.numpy().view(np.int32), keys, shift)
    keys.sort(axis=-1)
    expected = torch.argsort(values.abs().transpose(1, 2).reshape(-1, span), dim=1, stable=True)
    assert torch.equal(torch.from_numpy(keys & ((1 << shift) - 1)), expected)


def by_rank_operations(grid, order, draws, by_rank, rescale):
    """DELLA's keep-and-rescale as element-wise operations: the probabilities scattered to their elements,
    compared with the draws, the rest masked to +0, the kept divided by their probability."""
    units, span, rest = grid.shape
    probability = torch.empty(units, rest, span, dtype=grid.dtype)
    probability.view(-1, span).scatter_(1, order, by_rank.expand(order.shape))
    probability = probability.transpose(1, 2)
    kept = torch.empty(grid.shape, dtype=torch.bool)
    compare(np.less, draws, probability.contiguous(), kept)
    out = keep_only(grid.clone().view(-1), kept.view(-1), torch.empty(grid.numel(), dtype=INT_VIEW[grid.dtype]))
    return out.view(grid.shape).div_(probability) if rescale else out.view(grid.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("packed", [True, False])
def test_della_pruning_gives_the_bits_of_the_operations(dtype, rescale, packed):
    """Probabilities at and below 0 (+0 / 0 is NaN, +0 / negative is -0), above 1, draws equal to them, and
    NaN, infinities, zeros of either sign and denormals in the values."""
    units, span, rest = 6, 257, 2
    g = torch.Generator().manual_seed(5)
    grid = edge_values(units * span * rest, dtype, 3).view(units, span, rest)
    order = torch.stack([torch.randperm(span, generator=g) for _ in range(units * rest)])
    by_rank = torch.linspace(-0.2, 1.1, span, dtype=dtype)
    by_rank[::7] = 0.0
    draws = torch.rand(grid.shape, generator=g)
    draws.view(-1)[::5] = by_rank.float().repeat(units * rest)[::5].clamp(0, 1)  # draws equal to a probability
    expected = by_rank_operations(grid, order, draws, by_rank, rescale)
    shift = magprune.position_bits(span)
    # packed: the order as sorted keys carry it, positions below a magnitude; else plain (argsort's order)
    keys = (torch.randint(0, 1 << 20, order.shape, generator=g) << shift) | order if packed else order
    got = grid.clone()
    magprune.prune_ranked(got.numpy(), keys.numpy(), (1 << shift) - 1 if packed else -1, draws.numpy(),
                          by_rank.numpy(), rescale)
    bits = INT_VIEW[dtype]
    assert torch.equal(got.view(bits), expected.view(bits))


def dare_by_operations(x, base, draws, density, rescale, weight):
    """DARE's step as element-wise operations: the task vector, +0 where the draw is not below the density (as
    the values' dtype holds it; +-inf to keep all or none), divided by the density, times the weight."""
    delta = torch.sub(x, base)
    keep_only(delta, draws.double() < density, torch.empty(delta.numel(), dtype=INT_VIEW[x.dtype]))
    return (delta.div_(density) if rescale else delta).mul_(weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("density, rescale, weight", [(0.3, True, 0.7), (0.3, False, -1.3), (0.9, True, -0.2),
                                                      (math.inf, False, 0.4), (-math.inf, False, -0.4)])
@pytest.mark.parametrize("start", [0, 3, 2 ** 32 + 1])
def test_dare_kernels_give_the_bits_of_the_operations(dtype, density, rescale, weight, start):
    n = 5000  # several draw spans, not a whole number of blocks
    x, base = edge_values(n, dtype, 1), edge_values(n, dtype, 2)
    base[::9] = x[::9]  # task vectors of +-0
    uniform = Uniform(5, "t", 1)
    draws = torch.from_numpy(uniform.fill(start, np.empty(n, dtype=np.float32)))
    threshold = float(torch.tensor(density, dtype=dtype)) if math.isfinite(density) else density
    expected = dare_by_operations(x, base, draws, threshold, rescale, weight)
    total = edge_values(n, dtype, 3)
    expected_total = total.clone().add_(expected)
    dare.add_dropped(x.numpy(), base.numpy(), total.numpy(), start, uniform.stream, threshold, density, rescale,
                     weight, False)
    first_total = edge_values(n, dtype, 4)  # not read: the first model's step adds to +0
    dare.add_dropped(x.numpy(), base.numpy(), first_total.numpy(), start, uniform.stream, threshold, density,
                     rescale, weight, True)
    sums = [edge_values(n, dtype, 5 + k) for k in range(4)]
    expected_sums = [s.clone() for s in sums]
    add_by_sign(expected.numpy(), *(s.numpy() for s in expected_sums), weight, False)
    dare.add_dropped_by_sign(x.numpy(), base.numpy(), *(s.numpy() for s in sums), start, uniform.stream, threshold,
                             density, rescale, weight, False)
    bits = INT_VIEW[dtype]
    assert torch.equal(total.view(bits), expected_total.view(bits))
    assert torch.equal(first_total.view(bits), torch.zeros(n, dtype=dtype).add_(expected).view(bits))
    assert all(torch.equal(got.view(bits), want.view(bits)) for got, want in zip(sums, expected_sums))
    dare.add_dropped_by_sign(x.numpy(), base.numpy(), *(s.numpy() for s in sums), start, uniform.stream, threshold,
                             density, rescale, weight, True)
    zeros = [torch.zeros(n, dtype=dtype) for _ in range(4)]
    add_by_sign(expected.numpy(), *(s.numpy() for s in zeros), weight, False)
    assert all(torch.equal(got.view(bits), want.view(bits)) for got, want in zip(sums, zeros))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("low, high", [(0.25, None), (0.25, 1.0), (0.0, 1e-45), (0.0, 0.0), (math.inf, None),
                                       (1e-45, math.inf)])
@pytest.mark.parametrize("inclusive", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("normalize, scale", [(True, 1.0), (False, -1.3), (True, 0.7)])
@pytest.mark.parametrize("elect", [True, False])
def test_magnitude_kernel_gives_the_bits_of_the_operations(dtype, low, high, inclusive, normalize, scale, elect):
    """The merge with bounds of either kind as `Bounds.limits` makes them inclusive, against the comparisons of
    `Bounds.admit` and `keep_only`, a rescale factor's and the weight's multiplications and then TIES' consensus
    kernels' sums (`elect`) or the plain sum, division and scaling of torch's operations in `task_vector_merge`, on
    values with many ties at the bounds, NaN, infinities, zeros of either sign, denormals; beside them a model that
    keeps everything (NaN included) and one that keeps nothing, as `magnitude_ranks` gives them."""
    from streammerge.methods.sparsifiers import Bounds, weight_divisor
    n = 20_000
    g = torch.Generator().manual_seed(9)
    base = (torch.randint(-8, 9, (n,), generator=g) / 8).to(dtype)  # (few values: many equal magnitudes)
    base[1::3] = edge_values(len(base[1::3]), dtype, 5)
    inputs = []
    for k in range(4):
        x = (torch.randint(-8, 9, (n,), generator=g) / 8).to(dtype)
        x[k::3] = edge_values(len(x[k::3]), dtype, 4 + k)
        inputs.append(x)
    bounds = Bounds(low, high, [], low_inclusive=inclusive[0], high_inclusive=inclusive[1])
    kinds = ["bounds", "bounds", "all", "none"]  # (the second rescaled)
    factors, weights = [1.0, 1.7, 1.0, 1.0], [-0.3, 0.45, 0.2, 0.6]
    deltas = []
    for x, kind, factor, weight in zip(inputs, kinds, factors, weights):
        delta = torch.sub(x, base)
        if kind == "bounds":
            keep, scratch = torch.empty(n, dtype=torch.bool), torch.empty(n, dtype=torch.bool)
            bounds.admit(delta.abs(), keep, scratch)
            keep_only(delta, keep, torch.empty(n, dtype=INT_VIEW[dtype]))
        elif kind == "none":
            delta.zero_()
        if factor != 1.0:
            delta.mul_(factor)
        deltas.append(delta.mul_(weight))
    if elect:
        expected = [torch.full((n,), 7.0, dtype=dtype) for _ in range(4)]
        for k, (delta, weight) in enumerate(zip(deltas, weights)):
            add_by_sign(delta.numpy(), *(s.numpy() for s in expected), weight, k == 0)
        finish(*(s.numpy() for s in expected), base.numpy(), normalize, scale)
    else:
        mixed = torch.zeros(n, dtype=dtype)
        for delta in deltas:
            mixed.add_(delta)
        if normalize:
            mixed.div_(weight_divisor([{"weight": w} for w in weights]))
        if scale != 1:
            mixed.mul_(scale)
        expected = [torch.add(base, mixed)]
    as_dtype = base.numpy().dtype
    limits = bounds.limits(as_dtype)
    nothing = (as_dtype.type(math.nan),) * 2
    lows, highs = (np.array(b, dtype=as_dtype) for b in zip(limits, limits, nothing, nothing))
    out = torch.empty(n, dtype=dtype)
    arrays = (tuple(x.numpy() for x in inputs), base.numpy(), lows, highs, np.array([kind == "all" for kind in kinds]),
              np.array(factors, dtype=as_dtype), np.array(weights, dtype=as_dtype), out.numpy())
    if elect:
        magnitude.merge_within_by_sign(*arrays, normalize, scale)
    else:
        magnitude.merge_within(*arrays, normalize, weight_divisor([{"weight": w} for w in weights]), scale)
    assert same_bits_or_both_nan(out, expected[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_magnitudes_are_counted_and_found(dtype):
    """The kernels `TieGate.span` places its admitted ties with: |x - base| == value, NaN equal to nothing."""
    x = torch.tensor([1.0, 3.0, -1.0, 0.5, float("nan"), 1.0, 2.0], dtype=dtype)
    base = torch.tensor([0.0, 2.0, 0.0, 0.5, 0.0, 0.0, 0.0], dtype=dtype)  # magnitudes 1, 1, 1, 0, NaN, 1, 2
    one = base.numpy().dtype.type(1)
    assert magnitude.count_equal(x.numpy(), base.numpy(), one) == 4
    assert [magnitude.index_of_equal(x.numpy(), base.numpy(), one, k) for k in range(5)] == [0, 1, 2, 5, 7]
    assert magnitude.count_equal(x.numpy(), base.numpy(), base.numpy().dtype.type(math.nan)) == 0


def same_bits_or_both_nan(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal bit patterns, but for NaN, whose sign and payload depend on the order of a commutative addition's
    operands (x86 keeps the first NaN), which the compiler may swap (and torch's vectorised body and scalar tail
    may differ in): a NaN for a NaN."""
    bits = INT_VIEW[got.dtype]
    both_nan = got.isnan() & expected.isnan()
    return bool((both_nan | (got.view(bits) == expected.view(bits))).all())


def sce_by_operations(inputs: list[torch.Tensor], base: torch.Tensor, keep: torch.Tensor | None,
                      weights: list[float]) -> torch.Tensor:
    """sce's merge as the element-wise torch operations mergekit's definition takes (`methods.sce` documents it)."""
    def delta(x: torch.Tensor) -> torch.Tensor:
        d = torch.sub(x, base)
        return d.masked_fill_(~keep, 0) if keep is not None else d

    n, dtype = base.numel(), base.dtype
    total = torch.zeros(n, dtype=dtype)
    for x in inputs:
        total.add_(delta(x))
    positive = total >= 0
    mixed, divisor = torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype)
    for x, weight in zip(inputs, weights):
        d = delta(x)
        flags = torch.where(positive, d > 0, d < 0).to(dtype)
        mixed.add_(d.mul_(flags).mul_(weight))
        divisor.add_(flags.mul_(torch.tensor(weight, dtype=torch.float32).item()))
    mixed.div_(divisor.clamp_(min=1e-6))
    return mixed.add_(base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1.0], [0.1, 0.7], [0.25, 0.25, 0.25, 0.25], [1e-9, 0.3, 0.1]])
@pytest.mark.parametrize("selects", [False, True])
def test_sce_kernels_give_the_bits_of_the_operations(dtype, weights, selects):
    """sce's merge and its squares, on deltas with many ties, NaN, infinities, zeros of either sign, denormals, sums
    that cancel, with and without a selection mask."""
    n = 30_000
    g = torch.Generator().manual_seed(len(weights))
    base = (torch.randint(-8, 9, (n,), generator=g) / 8).to(dtype)
    base[::5] = edge_values(len(base[::5]), dtype, 1)
    inputs = [(torch.randint(-8, 9, (n,), generator=g) / 8).to(dtype) for _ in weights]
    for k, x in enumerate(inputs):
        x[k::3] = edge_values(len(x[k::3]), dtype, 10 + k)
    if len(inputs) > 1:
        inputs[-1][::7] = 2 * base[::7] - inputs[0][::7]  # deltas that cancel
    keep = torch.rand(n, generator=g) < 0.6 if selects else None
    mask = keep.numpy() if selects else np.zeros(1, dtype=bool)
    expected = sce_by_operations(inputs, base, keep, weights)
    out = edge_values(n, dtype, 3)  # (written, not read)
    as_dtype = base.numpy().dtype
    sce.merge(tuple(x.numpy() for x in inputs), base.numpy(), mask, selects, np.array(weights, dtype=as_dtype),
              np.array([torch.tensor(w, dtype=torch.float32).item() for w in weights], dtype=as_dtype), out.numpy())
    assert same_bits_or_both_nan(out, expected)
    # the squares' sums: GroupSums' grid-block sums of each torch.mul square (whole blocks, a short last one)
    # the edge values make most sums NaN: their finite part (signed zeros, denormals) too, where every bit shows
    finite = [torch.where(t.isfinite(), t, 0.0).clamp_(-1e3, 1e3) for t in (*inputs, base)]
    for values, (repeat, n_summed) in itertools.product((inputs + [base], finite),
                                                        ((5, 5 * n), (1, n), (1, 1), (1, 3))):
        xs = [x.repeat(repeat)[:n_summed] for x in values[:-1]]  # 5n: two whole grid blocks and a short one
        b, kept = values[-1].repeat(repeat)[:n_summed], keep.repeat(repeat)[:n_summed] if selects else None
        sums = GroupSums(Groups("tensor", (n_summed,)), len(inputs))
        for i, x in enumerate(xs):
            d = torch.sub(x, b)
            if selects:
                d.masked_fill_(~kept, 0)
            sums.add(i, 0, torch.mul(d, d))
        block_sums = np.full((-(-n_summed // GRID), len(inputs)), np.nan)
        sce.squares_block_sums(tuple(x.numpy() for x in xs), b.numpy(), kept.numpy() if selects else mask, selects,
                               GRID, block_sums)
        totals = GroupSums(Groups("tensor", (n_summed,)), len(inputs))
        totals.add_block_sums(block_sums)
        assert same_bits_or_both_nan(totals.sums, sums.sums), n_summed
        assert values is not finite or totals.sums.isfinite().all()


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("ranges", [1, 2, 3])
def test_bracket_kernel_counts_and_keeps_what_numpy_does(dtype, ranges):
    """`brackets.bracket_slice` against numpy's (`streaming.bracket_slice`) and plain comparisons: the same counts,
    the same elements in the same order, on patterns with many repeats, ranges from the smallest pattern (0) to the
    largest (an open top, as `_rank_brackets` makes it), and slices of 0, 1 and many elements, the counts added to
    what they held."""
    top = np.iinfo(dtype).max
    rng = np.random.default_rng(ranges)
    values = np.concatenate([rng.integers(0, 50, 3000), rng.integers(0, top, 3000, dtype=dtype, endpoint=True),
                             [0, top, top - 1, 1]]).astype(dtype)
    rng.shuffle(values)
    cases = {1: [[[0, 9]], [[17, 17]], [[top - 5, top]]],
             2: [[[0, 0], [30, top]], [[5, 20], [21, 22]]],
             3: [[[0, 3], [10, 10], [40, top]], [[1, 2], [45, 49], [1 << 20, top]]]}[ranges]
    for ranges_ in cases:
        lows, spans = streaming.range_bounds(ranges_)
        for part in (values[:0], values[:1], values[1:], values[::7]):
            part = np.ascontiguousarray(part)
            wanted = part[np.any([(part >= low) & (part <= high) for low, high in ranges_], axis=0)]
            counts = [k + 1 + int(np.count_nonzero(part < low)) for k, (low, _) in enumerate(ranges_)]
            for slice_pass in (bracket_slice, streaming.bracket_slice):
                below = np.arange(1, ranges + 1, dtype=np.int64)  # (added to)
                mask, out = np.empty(part.size, np.uint8), np.empty(part.size, dtype)
                kept = slice_pass(part, lows, spans, below, mask, out)
                np.testing.assert_array_equal(out[:kept], wanted)
                assert below.tolist() == counts


def ulps_from(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return np.abs(values - reference) / np.spacing(np.abs(reference))


def test_fusion_exp_and_log_are_within_two_ulps_of_the_c_library():
    """`kernels.fusion`'s vectorised exp and log against the C library's (`math.exp`, `math.log`, correctly rounded
    or nearly so) over their whole ranges, float32 inputs included: within 2 units in the last place, exps below
    the smallest normal 0 or subnormal, and the special values as the kernel documents them."""
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.uniform(-745, 709, 200_000), rng.normal(0, 1, 200_000), rng.uniform(-40, 0.5, 200_000),
                        [0.0, -0.0, 1e-300, -1e-300, 709.0, -708.0, 0.5 * math.log(2), -0.5 * math.log(2)]])
    for dtype, shift in ((np.float64, 0.0), (np.float32, 0.75)):
        values = x.astype(dtype)
        out = np.full(values.size, np.nan)
        fusion.exp_into(values, shift, out, np.empty(values.size, np.int64))
        reference = np.array([math.exp(float(v) - shift) for v in values])
        normal = reference >= np.finfo(np.float64).tiny
        assert ulps_from(out[normal], reference[normal]).max() <= 2
        assert ((out[~normal] >= 0) & (out[~normal] < np.finfo(np.float64).tiny)).all()  # 0 or subnormal
    specials = np.array([np.nan, -np.inf, np.inf, -1e5, 1e5])
    out = np.empty(5)
    fusion.exp_into(specials, 0.0, out, np.empty(5, np.int64))
    assert np.isnan(out[0]) and out[1:].tolist() == [0.0, np.inf, 0.0, np.inf]
    y = np.concatenate([np.exp(rng.uniform(-700, 700, 200_000)), rng.uniform(0.5, 2, 200_000),
                        [1.0, 2.0, 0.5, 1e-8, 1e8, math.sqrt(2), np.nextafter(math.sqrt(2), 2), 1 + 2 ** -52]])
    out = np.full(y.size, np.nan)
    fusion.log_into(y, out, np.empty(y.size, np.int64))
    reference = np.array([math.log(v) for v in y])
    exact = reference == 0
    assert (out[exact] == 0).all() and ulps_from(out[~exact], reference[~exact]).max() <= 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fusion_row_kl_is_the_float64_softmax_kl(dtype):
    """`kernels.fusion.row_kl` against torch's float64 softmaxes: sum p log(p / q), p and q the rows' softmaxes
    plus 1e-8, within 1e-12 of the largest row's KL; NaN for rows with a NaN or +inf, or only -inf, in either
    input, and finite where a -inf sits among finite values; rows of one element are 0."""
    rng = np.random.default_rng(5)
    rows, period = 40, 300
    base = rng.normal(0, 3, (rows, period)).astype(dtype)
    x = (base + rng.normal(0, 0.02, (rows, period))).astype(dtype)
    x[:5] += rng.normal(0, 1, (5, period)).astype(dtype)  # rows of large KL
    x[10, 3], x[11, 0], base[12, 9], x[13], x[14, 5], base[15] = np.inf, np.nan, np.nan, -np.inf, -np.inf, np.inf
    out = np.full(rows, 7.0)
    fusion.row_kl(x.reshape(-1), base.reshape(-1), period, 1e-8, out)
    p = torch.softmax(torch.from_numpy(x).double(), -1) + 1e-8
    q = torch.softmax(torch.from_numpy(base).double(), -1) + 1e-8
    reference = (p * torch.log(p / q)).sum(-1).numpy()
    nan = np.isnan(out)
    assert np.flatnonzero(nan).tolist() == [10, 11, 12, 13, 15] and np.array_equal(nan, np.isnan(reference))
    assert np.abs(out[~nan] - reference[~nan]).max() <= 1e-12 * np.abs(reference[~nan]).max()
    assert out[:5].min() > 100 * np.median(out[16:])
    single = np.full(3, 7.0)
    fusion.row_kl(x[0, :3].copy(), base[0, :3].copy(), 1, 1e-8, single)
    assert single.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("period, offset", [(7, 0), (7, 3), (1000, 250), (1, 5)])
def test_fusion_importance_and_merge_give_the_bits_of_the_operations(dtype, period, offset):
    """`kernels.fusion.importance` and `fuse` against arcee_fusion's torch operations (sub, mul by the row's KL,
    abs; ge against a Python float, which torch rounds to the dtype; mul, add), edge values included, for chunks
    starting inside a row, and thresholds equal to an importance and between a value and its float32 rounding."""
    n = 3000
    x, base = edge_values(n, dtype, 11), edge_values(n, dtype, 12)
    rows = -(-(offset + n) // period)
    kl = torch.rand(rows, generator=torch.Generator().manual_seed(13), dtype=torch.float64).to(dtype)
    kl[::5] = 0.0
    row_kl = kl[torch.arange(offset, offset + n) // period]
    expected = torch.abs((x - base) * row_kl)
    out = torch.full((n,), 7.0, dtype=dtype)
    fusion.importance(x.numpy(), base.numpy(), kl.numpy(), period, offset, out.numpy())
    assert same_bits_or_both_nan(out, expected)
    finite = expected[expected.isfinite() & (expected > 0)]
    for threshold in (float(finite.median()), 0.7, 0.0, math.inf):
        keep = torch.ge(expected, threshold).to(dtype)
        merged = torch.mul(x - base, keep).add_(base)
        fusion.fuse(x.numpy(), base.numpy(), kl.numpy(), period, offset, out.numpy().dtype.type(threshold),
                    out.numpy())
        assert same_bits_or_both_nan(out, merged), threshold


def ram_by_operations(xs: list[torch.Tensor], base: torch.Tensor, epsilon: float,
                      scales: list[float] | None) -> torch.Tensor:
    """ram's merge (ramplus_tl's with `scales`) as torch's element-wise operations: each model's delta masked by
    |delta| > epsilon (a Python float, which torch rounds to the dtype) through a multiplication, counted, summed,
    and with scales, summed again scaled (`add_` with alpha); the sum over the count (at least 1), or the scaled
    sum where one model changed the entry, plus the base."""
    n, dtype = base.numel(), base.dtype
    delta, changed, count, shared, scaled = (torch.zeros(n, dtype=dtype) for _ in range(5))
    for i, x in enumerate(xs):
        torch.sub(x, base, out=delta)
        torch.gt(torch.abs(delta, out=changed), epsilon, out=changed)
        delta.mul_(changed)
        count.add_(changed)
        shared.add_(delta)
        if scales is not None:
            scaled.add_(delta, alpha=scales[i])
    averaged = torch.div(shared, count.clamp(min=1))
    return (torch.where(count == 1, scaled, averaged) if scales is not None else averaged).add_(base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("models", [1, 2, 3, 5])
@pytest.mark.parametrize("epsilon", [0.0, 1e-5, 0.5])
def test_ram_kernels_give_the_bits_of_the_operations(dtype, models, epsilon):
    """`kernels.ram.merge` (ram, and ramplus_tl with scales of at least 1: below 1, a product that underflows to
    zero may take another sign where torch fuses `add_`'s multiply and add) against the torch operations, edge
    values and entries equal to the base included; `count_changes` adds to the counts it is given the entries
    each model changed alone and with others."""
    n = 20_000
    base = edge_values(n, dtype, 20)
    xs = [edge_values(n, dtype, 21 + i) for i in range(models)]
    for i, x in enumerate(xs):
        x[i::models + 2] = base[i::models + 2]  # unchanged entries, some shared between models
    arrays, as_dtype = tuple(x.numpy() for x in xs), base.numpy().dtype.type
    for scales in (None, [1.0 + 0.15 * i for i in range(models)]):
        out = torch.full((n,), 7.0, dtype=dtype)
        factors = np.array(scales if scales is not None else [1.0] * models, dtype=as_dtype)
        ram.merge(arrays, base.numpy(), as_dtype(epsilon), factors, scales is not None, out.numpy())
        assert same_bits_or_both_nan(out, ram_by_operations(xs, base, epsilon, scales)), scales
    changed = torch.stack([torch.abs(x - base) > epsilon for x in xs])
    count = changed.sum(0)
    counts = np.full((2, models), 5, dtype=np.int64)
    ram.count_changes(arrays, base.numpy(), as_dtype(epsilon), counts)
    assert counts.tolist() == [[5 + int((c & (count == 1)).sum()) for c in changed],
                               [5 + int((c & (count > 1)).sum()) for c in changed]]
    assert counts[0].sum() > 5 * models and (models == 1 or counts[1].sum() > 5 * models)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("models", [2, 3, 5])
@pytest.mark.parametrize("ratio", [0.37, 1.0, 0.0, -0.25])
def test_model_stock_kernel_gives_the_bits_of_the_operations(dtype, models, ratio):
    """`kernels.stock.merge` against model_stock's torch operations with one ratio per tensor (the models summed
    into the first's copy, divided by their count, times the ratio, plus the base times 1 - ratio), edge values
    included."""
    n = 20_000
    base = edge_values(n, dtype, 30)
    xs = [edge_values(n, dtype, 31 + i) for i in range(models)]
    expected = xs[0].clone()
    for x in xs[1:]:
        expected.add_(x)
    expected.div_(models).mul_(ratio).add_(torch.mul(base, 1 - ratio))
    out = torch.full((n,), 7.0, dtype=dtype)
    stock.merge(tuple(x.numpy() for x in xs), base.numpy(), ratio, 1 - ratio, out.numpy())
    assert same_bits_or_both_nan(out, expected)
