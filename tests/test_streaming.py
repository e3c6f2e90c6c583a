"""The streaming statistics on their own, against plain torch on whole tensors: exact order statistics
(`RankSelect` vs torch.kthvalue), tie admission by position (`TieGate`), per-group float64 sums (`GroupSums`)
and the seeded uniform draws (`Uniform`), on random data with many ties, fed in chunks of several sizes."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
import torch

from streammerge.methods import streaming
from streammerge.methods.method import GRID
from streammerge.methods.streaming import (Groups, GroupSums, RankSelect, TieGate, Uniform, pairwise_sums,
                                           stream_key)


def tied_magnitudes(n: int, seed: int, dtype=torch.float32, distinct: int = 50) -> torch.Tensor:
    """Non-negative numbers with few distinct values (every value tied many times), a few zeros and a spread
    of exponents, so radix digits differ in high and low bits."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(distinct, generator=g, dtype=torch.float64) * torch.logspace(-6, 3, distinct, dtype=torch.float64)
    values[0] = 0
    return values[torch.randint(0, distinct, (n,), generator=g)].to(dtype)


def chunked(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


def select(x: torch.Tensor, ranks: list[int], chunk: int) -> RankSelect:
    s = RankSelect(ranks, x.dtype)
    digits = torch.empty(chunk, dtype=x.dtype)
    for p in range(s.passes):
        for a, b in chunked(x.numel(), chunk):
            s.observe(p, x[a:b], digits[:b - a])
        s.finish_pass(p)
    return s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [20011, GRID, 3 * GRID + 17])  # 20011: 8 chunks a pass, none on the grid
def test_rank_select_matches_kthvalue(dtype, chunk):
    n = 2 * GRID + 12345
    for seed, distinct in ((0, 50), (1, 100000)):
        x = tied_magnitudes(n, seed, dtype, distinct)
        ranks = [0, 1, n // 3, n // 2, n - 2, n - 1]
        s = select(x, ranks, chunk)
        for j, rank in enumerate(ranks):
            expected = torch.kthvalue(x, rank + 1).values
            assert s.value(j) == expected.item(), (rank, s.value(j), expected)
            below = int((x < expected).sum())
            assert s.ties_before(j) == rank - below
            assert s.count_equal[j] == int((x == expected).sum())


@pytest.mark.parametrize("partition_whole", [True, False])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_select_of_a_whole_tensor_at_once_equals_the_passes(dtype, in_place, partition_whole, monkeypatch):
    """A whole-tensor chunk is selected at once (a partition of a copy, or of the values themselves; all of it or
    what sample brackets hold, whichever this machine does faster: both forced here), with ranks set after the
    first pass as sce sets them: the same value, ties before and count of equal elements as the histogram
    passes."""
    bracketed = []
    monkeypatch.setattr(streaming, "partition_beats_brackets", lambda: partition_whole)
    spy = streaming._select_bracketed
    monkeypatch.setattr(streaming, "_select_bracketed", lambda *args: bracketed.append(1) or spy(*args))
    n = GRID + 4321
    for seed, distinct in ((0, 50), (1, 100000), (2, 1)):
        x = tied_magnitudes(n, seed, dtype, distinct)
        ranks = [0, 1, n // 3, n // 2, n - 2, n - 1]
        passes = select(x, ranks, GRID)
        whole = RankSelect([0] * len(ranks), dtype)
        digits = x if in_place else torch.empty(n, dtype=dtype)  # (the passes above are done with x)
        whole.observe(0, x, digits, whole=True)
        for j, rank in enumerate(ranks):
            whole.set_rank(j, rank)
        for p in range(whole.passes):
            whole.observe(p, x, digits, whole=True)
            whole.finish_pass(p)
        assert whole.done
        for j in range(len(ranks)):
            assert (whole.value(j), whole.ties_before(j), whole.count_equal[j]) == \
                (passes.value(j), passes.ties_before(j), passes.count_equal[j])
    assert bool(bracketed) != partition_whole  # (the path forced is the one taken)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_select_of_deltas_at_once_equals_the_passes(dtype, compiled):
    """A whole tensor's magnitudes |x - base| bracketed from x and base in one pass (`select_deltas`, made a
    slice at a time, across two threads where the tensor is large) select what the histogram passes select over
    the magnitudes made whole: value, ties before and count of equal ones. Where the strided sample is unlike the
    rest (a range misses its rank) or a value fills the ranges (all equal), it selects nothing and says so."""
    g = torch.Generator().manual_seed(11)
    n = 2 * GRID + 4321
    normal, base = torch.randn(n, generator=g, dtype=dtype), torch.randn(n, generator=g, dtype=dtype)
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(dtype)
    tied = tied_magnitudes(n, 5, dtype, 50) * signs  # (against a zero base: deltas tied exactly)
    odd = normal.clone()
    odd[::5] = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1e-30], dtype=dtype).repeat(n)[:odd[::5].numel()]
    stride = (n // streaming.SAMPLE) | 1
    against_the_sample = normal.clone()
    against_the_sample[::stride] = base[::stride] + 1e-3  # (the sample sees only tiny deltas)
    large = torch.randn(2 * streaming.COUNT_SLICE + 4321, generator=g, dtype=dtype)
    cases = [(normal, base, True), (tied, torch.zeros(n, dtype=dtype), True), (odd, base, True),
             (base, base, False), (against_the_sample, base, False),
             (large, torch.zeros_like(large), True)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for case, (x, b, selected) in enumerate(cases):
            m = x.numel()
            ranks = [0, 1, m // 11, m // 3, m - m // 100, m - 2, m - 1]
            reference = select((x - b).abs(), ranks, GRID)
            # the threads' scratch new, or carved from free buffers (3 of them) where they hold it
            for area in (None, torch.full((3 * m,), math.nan, dtype=dtype), torch.empty(100, dtype=dtype)):
                deltas = RankSelect(list(ranks), dtype)
                room = torch.full((m,), math.nan, dtype=dtype)
                assert deltas.select_deltas(x, b, room, compiled, area) == selected == deltas.done, case
                for j in range(len(ranks) if selected else 0):  # (the values' bit patterns: NaN's too)
                    assert (deltas.prefix[j], deltas.ties_before(j), deltas.count_equal[j]) == \
                        (reference.prefix[j], reference.ties_before(j), reference.count_equal[j]), (case, j)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_whole_tensor_bracketed_in_one_pass_selects_what_the_passes_select(dtype, compiled, monkeypatch):
    """A tensor held whole whose caller asks for a bracketing pass (`bracket_whole`, as sce does), its rank set
    after the first pass: the same value, ties before and count of equal ones as the histogram passes, by the
    bracketing where its ranges hold the ranks, by a partition where one misses or where the digits buffer is the
    values themselves (no room beside them)."""
    bracketed = []
    spy = RankSelect._select_by_brackets
    monkeypatch.setattr(RankSelect, "_select_by_brackets", lambda *args: bracketed.append(spy(*args)) or bracketed[-1])
    n = GRID + 4321
    g = torch.Generator().manual_seed(13)
    normal = torch.randn(n, generator=g, dtype=dtype).abs()
    against_the_sample = normal.clone()
    against_the_sample[::(n // streaming.SAMPLE) | 1] = 1e-6  # (the sample sees only tiny values)
    cases = [(normal, False, [True]), (tied_magnitudes(n, 6, dtype, 50), False, [True]),
             (tied_magnitudes(n, 7, dtype, 100000), False, [True]), (against_the_sample, False, [False]),
             (normal, True, [])]
    for case, (values, in_place, taken) in enumerate(cases):
        ranks = [n // 7, n // 2, n - n // 50]
        whole = RankSelect([0] * len(ranks), dtype)
        whole.bracket_whole(torch.full((3 * n,), math.nan, dtype=dtype), compiled)
        digits = values.clone() if in_place else torch.empty(n, dtype=dtype)
        whole.observe(0, digits if in_place else values, digits, whole=True)
        for j, rank in enumerate(ranks):
            whole.set_rank(j, rank)
        bracketed.clear()
        assert whole.finish_pass(0) is None and whole.done
        assert bracketed == taken, case
        reference = select(values, ranks, GRID)
        for j in range(len(ranks)):
            assert (whole.prefix[j], whole.ties_before(j), whole.count_equal[j]) == \
                (reference.prefix[j], reference.ties_before(j), reference.count_equal[j]), (case, j)


def test_the_faster_whole_tensor_selection_is_measured_once(monkeypatch):
    """Whether a whole partition or the brackets select faster is timed once per process, on both."""
    calls = []
    for name in ("_select_partitioned", "_select_bracketed"):
        real = getattr(streaming, name)
        monkeypatch.setattr(streaming, name, lambda *args, real=real, name=name: calls.append(name) or real(*args))
    streaming.partition_beats_brackets.cache_clear()
    try:
        faster = streaming.partition_beats_brackets()
        assert isinstance(faster, bool)
        assert set(calls) == {"_select_partitioned", "_select_bracketed"}
        calls.clear()
        assert streaming.partition_beats_brackets() is faster and not calls
    finally:
        streaming.partition_beats_brackets.cache_clear()


@pytest.mark.parametrize("partition_faster", [True, False])
def test_a_pause_in_all_but_one_round_does_not_change_the_choice(partition_faster, monkeypatch):
    """The faster selection's first rounds slowed (a pause of the process, fresh memory touched): its best round
    still decides."""
    calls = {"_select_partitioned": 0, "_select_bracketed": 0}
    faster = "_select_partitioned" if partition_faster else "_select_bracketed"

    def timed(name: str):
        def select(*args):
            calls[name] += 1
            paused = name == faster and calls[name] < streaming.CALIBRATION_ROUNDS
            time.sleep(0.05 if paused else 0.001 if name == faster else 0.02)  # (wide: a busy machine oversleeps)
        return select

    for name in calls:
        monkeypatch.setattr(streaming, name, timed(name))
    streaming.partition_beats_brackets.cache_clear()
    try:
        assert streaming.partition_beats_brackets() is partition_faster
        assert calls == {name: streaming.CALIBRATION_ROUNDS for name in calls}
    finally:
        streaming.partition_beats_brackets.cache_clear()


def sorted_selection(bits: np.ndarray, ranks: list[int]) -> list[tuple[int, int, int]]:
    """(key, equal ones before it, equal ones in all) at each rank, from a full sort."""
    ordered = np.sort(bits)
    return [(int(ordered[r]), int(np.count_nonzero(ordered[:r] == ordered[r])),
             int(np.count_nonzero(ordered == ordered[r]))) for r in ranks]


def wide_magnitudes(n: int, seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    normal = np.abs(g.standard_normal(n)).astype(np.float32)
    tied = normal.copy()
    tied[g.random(n) < 0.1] = np.float32(0.5)  # a tenth of the tensor at one value, near the median
    rounded = torch.from_numpy(normal).bfloat16().float().numpy()  # few distinct values, as in half precision
    return {"normal": normal, "tied": tied, "rounded": rounded, "sawtooth": np.tile(np.arange(1000, dtype=np.float32),
            n // 1000 + 1)[:n], "float64": np.abs(g.standard_normal(n)) * (g.random(n) < 0.9)}


@pytest.mark.parametrize("in_place", [False, True])
def test_bracketed_selection_equals_a_full_partition(in_place):
    """The selection of a whole tensor by sample brackets gives what partitioning it whole gives (and a sort),
    at middle, extreme and neighbouring ranks, on spread, tied, rounded and periodic values; a separate scratch
    leaves the values as they were."""
    n = 300_007
    for name, values in wide_magnitudes(n, 0).items():
        bits = values.view(np.int64 if values.dtype == np.float64 else np.int32)
        for ranks in ([n // 2], [0, n - 1], [n // 10, n // 10 + 1, n - n // 100], [n // 3, n // 3]):
            expected = sorted_selection(bits, ranks)
            assert [tuple(map(int, s)) for s in streaming._select_partitioned(bits.copy(), ranks)] == expected
            scratch = bits.copy()
            keys = scratch if in_place else np.empty_like(bits)
            bracketed = streaming._select_bracketed(scratch, keys, ranks)
            assert bracketed is not None, (name, ranks)
            assert [tuple(map(int, s)) for s in bracketed] == expected, (name, ranks)
            if not in_place:
                assert np.array_equal(scratch, bits)


def test_keys_many_share_are_taken_out_before_partitioning(monkeypatch):
    """Keys shared by many (mostly-zero deltas, half-precision steps) are found with their exact counts, set aside
    by the selection (which then partitions only the rest), and the selection around them equals a full sort's at
    ranks inside, at the edges of and between their blocks, with one, several or only such keys."""
    set_aside = []
    around = streaming._select_around
    monkeypatch.setattr(streaming, "_select_around",
                        lambda keys, ranks, heavy: set_aside.append(heavy) or around(keys, ranks, heavy))
    n = 200_003
    g = np.random.default_rng(3)
    spread = np.abs(g.standard_normal(n)).astype(np.float32)
    mostly_zero = np.where(g.random(n) < 0.7, np.float32(0), spread)
    stepped = spread.copy()
    for value, share in ((0.25, 0.2), (0.5, 0.1), (2.0, 0.08)):
        stepped[g.random(n) < share] = np.float32(value)
    constant = np.full(n, 0.75, dtype=np.float32)
    for values, heavy in ((mostly_zero, [0.0]), (stepped, [0.25, 0.5, 2.0]), (constant, [0.75]),
                          (spread, [])):
        bits = values.view(np.int32)
        found = streaming._heavy_keys(bits)
        assert [np.int32(key).view(np.float32) for key, _, _ in found] == heavy
        ordered = np.sort(bits)
        for key, below, equal in found:
            assert (below, equal) == (np.searchsorted(ordered, key), np.count_nonzero(bits == key))
        edges = [r for key, below, equal in found for r in (below - 1, below, below + equal - 1, below + equal)]
        ranks = sorted({min(max(r, 0), n - 1) for r in edges + [0, n // 3, n // 2, n - 1]})
        expected = sorted_selection(bits, ranks)
        set_aside.clear()
        assert [tuple(map(int, s)) for s in streaming._select_partitioned(bits.copy(), ranks)] == expected
        assert (set_aside[0] if set_aside else []) == found  # (what the partition was spared)
        select = RankSelect(ranks, torch.float32)
        assert select.select_bits(bits.copy(), bits.copy())
        assert [(select.prefix[j], select.ties_before(j), select.count_equal[j]) for j in range(len(ranks))] == expected


def test_a_bracket_that_misses_leaves_the_values_to_a_full_partition():
    """Values laid out against the strided sample (every sampled element far above the rest) make the brackets
    miss: nothing is written, and `select_bits` partitions the whole tensor, with the exact result."""
    n = 1 << 20
    values = np.linspace(0, 1, n, dtype=np.float32)
    values[::max(n // streaming.SAMPLE, 1) | 1] = 1000.0
    bits = values.view(np.int32)
    ranks = [n // 2]
    expected = sorted_selection(bits, ranks)
    scratch = bits.copy()
    assert streaming._select_bracketed(scratch, scratch, ranks) is None
    assert np.array_equal(scratch, bits)
    select = RankSelect(ranks, torch.float32)
    assert select.select_bits(scratch, scratch) and select.done
    assert (select.prefix[0], select.ties_before(0), select.count_equal[0]) == expected[0]


def test_rank_select_all_equal_and_single_element():
    x = torch.full((GRID + 3,), 0.25)
    s = select(x, [0, GRID + 2], GRID)
    assert (s.value(0), s.value(1)) == (0.25, 0.25)
    assert (s.ties_before(0), s.ties_before(1)) == (0, GRID + 2)
    s = select(torch.tensor([7.0]), [0], 4)
    assert s.value(0) == 7.0 and s.ties_before(0) == 0 and s.count_equal[0] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [20011, GRID])
def test_rank_select_among_zeros_finishes_after_the_first_pass(dtype, chunk):
    """Ranks that all fall among the elements equal to 0 are selected by the first histogram pass, whatever else
    shares the zeros' digit bucket (subnormals): the later passes are skipped (`done`). Where a rank lies above the
    zeros, the passes go on. Either way the same selection as torch."""
    n = 2 * GRID + 12345
    g = torch.Generator().manual_seed(9)
    x = torch.rand(n, generator=g, dtype=torch.float64).to(dtype)
    x[torch.randperm(n, generator=g)[:n * 7 // 10]] = 0  # 70% zeros, in no order
    zeros = int((x == 0).sum())
    subnormal = x.clone()
    subnormal.view(torch.int64 if dtype == torch.float64 else torch.int32)[1::997] = 3  # (bit pattern 3: in bucket 0)
    cases = ((x, [0, n // 3, zeros - 1], True), (torch.zeros(n, dtype=dtype), [0, n - 1], True),
             (subnormal, [0, n // 3], True), (x, [0, zeros], False), (subnormal, [n // 3, zeros], False))
    for values, ranks, done_first in cases:
        s, finished = RankSelect(ranks, dtype), None
        digits = torch.empty(chunk, dtype=dtype)
        for p in range(s.passes):
            for a, b in chunked(n, chunk):
                s.observe(p, values[a:b], digits[:b - a])
            s.finish_pass(p)
            if s.done:  # (the histogram passes themselves never set it)
                finished = p
                break
        assert finished == (0 if done_first else None), ranks
        for j, rank in enumerate(ranks):
            expected = torch.kthvalue(values, rank + 1).values
            assert s.value(j) == expected.item(), (rank, s.value(j), expected)
            assert s.ties_before(j) == rank - int((values < expected).sum())
            assert s.count_equal[j] == int((values == expected).sum())


@pytest.mark.parametrize("chunk", [777, GRID, 2 * GRID])
def test_tie_gate_admits_positions_in_tensor_order(chunk):
    n = 3 * GRID + 5
    x = tied_magnitudes(n, 3, distinct=7)
    value = x[10].item()
    equal_positions = torch.nonzero(x == value).flatten()
    count = equal_positions.numel()
    for first, stop in ((0, count), (0, count // 3), (count // 4, count // 2), (count - 1, count), (5, 5)):
        gate = TieGate(value, first, stop)
        keep = torch.zeros(n, dtype=torch.bool)
        for a, b in chunked(n, chunk):
            k = b - a
            part = keep[a:b]
            gate.apply(x[a:b], part, torch.empty(k, dtype=torch.bool), torch.empty(k, dtype=torch.int64))
        expected = torch.zeros(n, dtype=torch.bool)
        expected[equal_positions[first:stop]] = True
        assert torch.equal(keep, expected), (first, stop)


@pytest.mark.parametrize("chunk", [777, GRID, 2 * GRID])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("total_known", [False, True])
def test_tie_gate_spans_hold_the_positions_it_admits(chunk, threads, total_known, monkeypatch):
    """`TieGate.span` on task vectors x - base: within each chunk's span, exactly the equal magnitudes the gate
    admits (what `apply` keeps), the equal elements counted on one thread or two, the count of all of them known
    (spans past the last admitted or from the first of all those left, without counting) or not."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(streaming, "KERNEL_GRAIN", 64)
    n = 3 * GRID + 5
    g = torch.Generator().manual_seed(3)
    base = torch.randint(-50, 50, (n,), generator=g).float()
    x = base + torch.randint(-6, 7, (n,), generator=g) / 4  # (magnitudes k / 4: few values, many ties)
    magnitudes = (x - base).abs()
    value = 0.75
    equal_positions = torch.nonzero(magnitudes == value).flatten()
    count = equal_positions.numel()
    assert count > 100
    for first, stop in ((0, count), (0, count // 3), (count // 4, count // 2), (count - 1, count), (5, 5)):
        gate = TieGate(value, first, stop, count if total_known else None)
        admitted = torch.zeros(n, dtype=torch.bool)
        for a, b in chunked(n, chunk):
            start, end = gate.span(x[a:b].numpy(), base[a:b].numpy())
            admitted[a + start:a + end] = magnitudes[a + start:a + end] == value
        expected = torch.zeros(n, dtype=torch.bool)
        expected[equal_positions[first:stop]] = True
        assert torch.equal(admitted, expected), (first, stop)


def test_tie_gate_keeps_what_was_already_kept():
    x = torch.tensor([1.0, 2.0, 1.0, 1.0])
    keep = torch.tensor([False, True, False, False])
    TieGate(1.0, 1, 2).apply(x, keep, torch.empty(4, dtype=torch.bool), torch.empty(4, dtype=torch.int64))
    assert keep.tolist() == [False, True, True, False]


SHAPES = [(5 * GRID + 99,), (300, 1001), (GRID // 2 + 3, 5), (7, 3, GRID // 4 + 1)]


@pytest.mark.parametrize("kind", ["tensor", "rows", "columns"])
@pytest.mark.parametrize("shape", SHAPES)
def test_group_sums_match_torch_and_are_chunk_invariant(kind, shape):
    """The same bits whatever the chunking, summed by numpy or by the compiled kernel."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g)
    groups = Groups(kind, shape)
    results = []
    for chunk, compiled in itertools.product((GRID, 2 * GRID, 5 * GRID, 6 * GRID), (False, True)):
        sums = GroupSums(groups, 2, compiled=compiled)
        flat = x.flatten()
        for a, b in chunked(flat.numel(), chunk):
            sums.add(0, a, flat[a:b])
            sums.add(1, a, flat[a:b].square())
        results.append(sums.sums)
    for other in results[1:]:
        assert torch.equal(results[0], other)  # the same bits whatever the chunking
    d, s = x.double(), x.square().double()  # the quantities as summed: float32 values, float64 sums
    if groups.kind == "tensor":
        expected = torch.stack([d.sum().view(1), s.sum().view(1)])
    elif kind == "rows":
        expected = torch.stack([d.reshape(-1, shape[-1]).sum(1), s.reshape(-1, shape[-1]).sum(1)])
    else:
        expected = torch.stack([d.reshape(shape[0], -1).sum(0), s.reshape(shape[0], -1).sum(0)])
    torch.testing.assert_close(results[0], expected, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("kind, shape", [("tensor", (5 * GRID + 99,)), ("tensor", (1000,)), ("tensor", (1,)),
                                         ("columns", (GRID // 64 + 3, 64)), ("columns", (GRID // 128 + 1, 64))])
@pytest.mark.parametrize("compiled", [False, True])
def test_a_short_last_block_sums_as_if_padded_to_the_grid(kind, shape, compiled):
    """The tensor's last, shorter block is summed over the next power of two: the bits of the documented sum of a
    whole grid block padded with zeros (signed zeros included)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g)
    x[x.abs() < 0.3] = -0.0
    flat, groups = x.flatten(), Groups(kind, shape)
    sums = GroupSums(groups, 1, compiled=compiled)
    for a, b in chunked(flat.numel(), 2 * GRID):
        sums.add(0, a, flat[a:b])
    width = 1 if groups.kind == "tensor" else groups.period
    expected = torch.zeros(groups.count, dtype=torch.float64)
    for a in range(0, flat.numel(), GRID):
        block = torch.zeros(GRID)
        block[:min(GRID, flat.numel() - a)] = flat[a:a + GRID]
        expected += pairwise_sums(block.view(1, GRID // width, width)).flatten()  # the block sums in order
    assert torch.equal(sums.sums[0].view(torch.int64), expected.view(torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind, shape", [("tensor", (1,)), ("tensor", (1000,)), ("tensor", (GRID,)),
                                         ("tensor", (3 * GRID + 7,)), ("rows", (40, 100))])
def test_sums_of_products_equal_each_product_summed_alone(kind, shape, dtype):
    """add_products (every pair's products of one grid block formed and summed at once, or pair by pair over
    larger chunks) gives the bits of summing each torch.mul product on its own, whatever the order of the pairs,
    for vectors that are views or computed into the scratch buffers, signed zeros and NaN included."""
    g = torch.Generator().manual_seed(7)
    n = math.prod(shape)
    models = [torch.randn(n, generator=g, dtype=dtype) for _ in range(4)]
    models[1][::7] = -0.0
    if n > 1:
        models[2][n // 2] = float("nan")
    base = torch.randn(n, generator=g, dtype=dtype)
    pairs = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2), (3, 0)]
    chunk = 2 * GRID
    first, second, product = (torch.full((chunk,), 5.0, dtype=dtype) for _ in range(3))
    for computed in (False, True):
        expected, got = GroupSums(Groups(kind, shape), len(pairs)), GroupSums(Groups(kind, shape), len(pairs))
        vectors = [m - base if computed else m for m in models]
        for a, b in chunked(n, chunk):
            for q, (i, j) in enumerate(pairs):
                expected.add(q, a, vectors[i][a:b] * vectors[j][a:b])

            def vector(i, buffer, a=a, b=b):
                return torch.sub(models[i][a:b], base[a:b], out=buffer[:b - a]) if computed else models[i][a:b]
            got.add_products(a, b - a, vector, pairs, product, first, second)
        assert torch.equal(got.sums.view(torch.int64), expected.sums.view(torch.int64))


@pytest.mark.parametrize("kind", ["tensor", "rows", "columns"])
def test_groups_expand_is_the_inverse_view(kind):
    shape = (300, 1001)
    groups = Groups(kind, shape)
    values = torch.arange(groups.count, dtype=torch.float64)
    whole = torch.empty(300 * 1001, dtype=torch.float64)
    for a, b in chunked(whole.numel(), GRID):
        groups.expand(values, a, whole[a:b])
    grid = whole.view(shape)
    if kind == "tensor":
        assert torch.equal(grid, torch.zeros(shape, dtype=torch.float64))
    elif kind == "rows":
        assert torch.equal(grid, values[:, None].expand(shape))
    else:
        assert torch.equal(grid, values[None, :].expand(shape))


PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def philox4x32_10(counter: list[np.ndarray], key: tuple[int, int]) -> list[np.ndarray]:
    """Philox4x32-10 (Random123's round and key schedule) on arrays of counters, written with numpy's uint64
    arithmetic: the reference the compiled generator is held to."""
    x = [np.asarray(c, dtype=np.uint64) for c in counter]
    k0, k1 = key
    for _ in range(10):
        p0, p1 = PHILOX_M[0] * x[0], PHILOX_M[1] * x[2]
        x = [(p1 >> np.uint64(32)) ^ x[1] ^ np.uint64(k0), p1 & np.uint64(0xFFFFFFFF),
             (p0 >> np.uint64(32)) ^ x[3] ^ np.uint64(k1), p0 & np.uint64(0xFFFFFFFF)]
        k0, k1 = (k0 + PHILOX_W[0]) & 0xFFFFFFFF, (k1 + PHILOX_W[1]) & 0xFFFFFFFF
    return x


@pytest.mark.parametrize("counter, key, expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((0xffffffff,) * 4, (0xffffffff,) * 2, (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1))])
def test_philox_blocks_are_random123s_known_answers(counter, key, expected):
    """Random123's known-answer vectors for philox4x32_10, by the reference and by the compiled block."""
    from numba import njit

    from streammerge.kernels import philox
    assert tuple(int(w[0]) for w in philox4x32_10([[c] for c in counter], key)) == expected
    block = njit(lambda c, k: philox._block(c[0], c[1], c[2], c[3], k[0], k[1]))
    assert tuple(int(w) for w in block(np.array(counter, np.uint32), np.array(key, np.uint32))) == expected


def reference_uniform(seed: int, name: str, stream: int, start: int, stop: int) -> torch.Tensor:
    """The documented draws: element i is word i % 4 of the Philox4x32-10 block at counter (i // 4 as two words,
    then the stream's words 0 and 1) under key (the stream's words 2 and 3), as (word >> 8) / 2**24."""
    words = stream_key(seed, name, stream)
    blocks = np.arange(start // 4, (stop + 3) // 4, dtype=np.uint64)
    counter = [blocks & np.uint64(0xFFFFFFFF), blocks >> np.uint64(32), np.full_like(blocks, words[0]),
               np.full_like(blocks, words[1])]
    out = np.stack(philox4x32_10(counter, (int(words[2]), int(words[3]))), axis=1).reshape(-1)
    out = out[start - 4 * (start // 4):][:stop - start]
    return torch.from_numpy((out >> np.uint64(8)).astype(np.float32) * np.float32(2.0**-24))


def draws_of(uniform: Uniform, start: int, n: int) -> torch.Tensor:
    return torch.from_numpy(uniform.fill(start, np.empty(n, dtype=np.float32)))


@pytest.mark.parametrize("start, stop", [(0, GRID), (0, 3 * GRID + 5), (GRID - 3, GRID + 4), (5 * GRID + 7, 7 * GRID),
                                         (12, 13), (3, 9), (8, 16), (1, 3), (2**32 * 4 - 6, 2**32 * 4 + 9)])
def test_uniform_draws_match_reference_and_any_split(start, stop):
    whole = draws_of(Uniform(7, "layer.weight", 2), start, stop - start)
    assert torch.equal(whole, reference_uniform(7, "layer.weight", 2, start, stop))
    middle = (start + stop) // 2
    parts = torch.cat([draws_of(Uniform(7, "layer.weight", 2), start, middle - start),
                       draws_of(Uniform(7, "layer.weight", 2), middle, stop - middle)])
    assert torch.equal(whole, parts)
    assert float(whole.min()) >= 0 and float(whole.max()) < 1


def test_uniform_draws_look_independent():
    """Coarse checks that a weak generator (or a bug putting one number in several places) would fail: the share
    kept at several probabilities, pairs of neighbours and the same element in two streams (chi-square of a
    4x4 table of quarters, 9 degrees of freedom: 40 is beyond p = 1e-5)."""
    n = 1 << 20
    draws = draws_of(Uniform(0, "w", 0), 0, n).double()
    other = draws_of(Uniform(0, "w", 1), 0, n).double()
    for p in (0.01, 0.1, 0.5, 0.9):
        kept = int((draws < p).sum())
        assert abs(kept - n * p) < 6 * math.sqrt(n * p * (1 - p))
    for a, b in ((draws[:-1], draws[1:]), (draws[:-4], draws[4:]), (draws, other)):
        table = torch.zeros(16, dtype=torch.float64).index_add_(
            0, ((a * 4).long() * 4 + (b * 4).long()), torch.ones(a.numel(), dtype=torch.float64))
        assert float(((table - a.numel() / 16) ** 2 / (a.numel() / 16)).sum()) < 40


def test_uniform_streams_differ():
    draws = [draws_of(Uniform(s, n, k), 0, 1000) for s, n, k in ((0, "a", 0), (1, "a", 0), (0, "b", 0), (0, "a", 1))]
    for i in range(len(draws)):
        for j in range(i + 1, len(draws)):
            assert not torch.equal(draws[i], draws[j])


def peak_growth(work, repeat: int = 3) -> int:
    """Peak growth of anonymous RSS while `work` runs (sampled by a thread; torch releases the GIL in its ops)."""
    import threading
    import time

    from streammerge.memory import anon_rss
    start, peak, done = anon_rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon_rss())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for _ in range(repeat):
            work()
    finally:
        done.set()
        sampler.join()
    return max(0, peak[0] - start)


def test_statistics_make_no_chunk_sized_temporaries():
    """The budget counts the chunk buffers only: histogram and tie passes must not copy a chunk (torch.bincount
    copies its input, cumsum with a dtype converts it), or a budget filled with buffers is exceeded."""
    n = 12 * 2**20  # 48 MiB of int32 per chunk-sized copy
    x = tied_magnitudes(n, 5)
    digits = torch.empty(n, dtype=torch.float32)
    keep, equal = (torch.zeros(n, dtype=torch.bool) for _ in range(2))
    counts = torch.zeros(n, dtype=torch.int32)
    select_ = RankSelect([n // 2], torch.float32)
    value = x[0].item()
    ties = int(torch.count_nonzero(x == value))

    def work():
        for p in range(select_.passes):
            select_.observe(p, x, digits)
        select_.hist = [h.zero_() for h in select_.hist]
        TieGate(value, 1, ties - 1).apply(x, keep, equal, counts)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (temporaries per thread would be small anyway)
    try:
        work()  # first touch of every buffer
        assert peak_growth(work) < 24 * 2**20
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("n", [1, 2, 3, 1000, GRID, GRID + 1, 3 * GRID + GRID // 2 + 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_base", [True, False])
def test_vector_products_formed_in_the_sums_give_the_bits_of_the_products(n, dtype, with_base):
    """`add_vector_products` forms the vectors (the task vectors, or the inputs themselves without a base) and
    their products inside the compiled tree's first level: the bits of `add_products` on the vectors as torch makes
    them, over whole and short blocks, in chunks, with zeros of either sign, infinities and NaN among the values."""
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g, dtype=dtype)
    inputs = [base + torch.randn(n, generator=g, dtype=dtype) * 10.0 ** -k for k in range(3)]
    inputs[0][::5] = base[::5]  # zero differences, products of -0 among them
    inputs[1][1::7] = -base[1::7] * 1e30
    if n > 20:
        inputs[2][[3, 11, n - 1]] = torch.tensor([math.inf, -math.inf, math.nan], dtype=dtype)
    else:  # a pair whose products are all -0 (+0 times negative differences)
        inputs[0], inputs[1] = base.clone(), base - 1
    if not with_base:
        inputs[0][1::3] = -0.0
        base = None
    pairs = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]
    chunk = 2 * GRID
    sums = {}
    for compiled, fused in ((False, False), (True, False), (True, True), (False, True)):
        group_sums = GroupSums(Groups("tensor", (n,)), len(pairs), compiled=compiled)
        for a, b in chunked(n, chunk):
            buffers = [torch.empty(b - a, dtype=dtype) for _ in range(3)]
            chunk_base = None if base is None else base[a:b]
            if fused:
                group_sums.add_vector_products(a, b - a, [x[a:b] for x in inputs], chunk_base, pairs, *buffers)
            else:
                group_sums.add_products(a, b - a, lambda i, buffer: inputs[i][a:b] if chunk_base is None else
                                        torch.sub(inputs[i][a:b], chunk_base, out=buffer[:b - a]), pairs, *buffers)
        sums[compiled, fused] = group_sums.sums
    for result in sums.values():
        assert torch.equal(result.view(torch.int64), sums[False, False].view(torch.int64))


def select_streamed(x: torch.Tensor, ranks: list[int], chunk: int, room: int, late_ranks: list[int] | None = None,
                    compiled: bool = False):
    """`select` with a first pass that brackets the ranks (`RankSelect.bracket_streamed`, by numpy or the compiled
    pass), the passes started over where it asks, as the engine does; late_ranks: set after the first chunk, as sce
    sets its rank. Returns the selection and the passes it took."""
    s = RankSelect(ranks, x.dtype)
    s.bracket_streamed(torch.empty(room, dtype=x.dtype), x.numel(), compiled)
    digits = torch.empty(chunk, dtype=x.dtype)
    p, passes = 0, 0
    while p < s.passes:
        for a, b in chunked(x.numel(), chunk):
            s.observe(p, x[a:b], digits[:b - a])
            if late_ranks and passes == 0 and a == 0:
                for j, rank in enumerate(late_ranks):
                    s.set_rank(j, rank)
        following = s.finish_pass(p)
        p, passes = p + 1 if following is None else following, passes + 1
        if s.done:
            break
    return s, passes


def test_equal_keys_are_counted_across_the_threads_ranges():
    keys = np.random.default_rng(3).integers(0, 50, size=9 * streaming.COUNT_SLICE + 5, dtype=np.int32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for value in (0, 17, 49, 50):
            assert streaming._count_equal(keys, value) == np.count_nonzero(keys == value)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("compiled", [False, True])
def test_streamed_brackets_split_large_chunks_between_threads(compiled):
    """Chunks of several count slices go to two threads, each counting and keeping its own range: the one pass
    still selects what the histogram passes select, every kept element in the room."""
    n, chunk = 7 * streaming.COUNT_SLICE + 123, 3 * streaming.COUNT_SLICE + 17
    values = torch.randn(n, generator=torch.Generator().manual_seed(9)).abs()
    ranks = [0, n // 3, n // 2, n - 1]
    # later chunks crowding the median's range: a thread's share of the room fills, the passes select instead
    crowded = values.clone()
    median = crowded.median()
    crowded[chunk:] = median + (crowded[chunk:] - median) * 1e-6
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for case, expected_passes in ((values, 1), (crowded, 1 + RankSelect.passes_for(torch.float32))):
            streamed, taken = select_streamed(case, ranks, chunk, n // 4, compiled=compiled)
            assert taken == expected_passes
            for j, rank in enumerate(ranks):
                assert streamed.value(j) == torch.kthvalue(case, rank + 1).values.item()
                assert streamed.ties_before(j) == select(case, ranks, chunk).ties_before(j)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("compiled", [False, True])
def test_streamed_brackets_narrow_their_ranges_to_fit_the_room(compiled, monkeypatch):
    """Where ranges of four standard errors either side of a rank would not fit the room, narrower ones are tried
    (`STREAMED_DEVIATIONS`) before giving the pass up to the histogram passes: one pass where two standard errors
    fit, the same selection; more passes where none fits, or where only four are tried."""
    n, chunk = 5 * GRID + 999, 20011
    values = torch.randn(n, generator=torch.Generator().manual_seed(7)).abs()
    ranks, more = [n // 10], 1 + RankSelect.passes_for(torch.float32)
    for deviations, room, passes in (((4.0, 3.0, 2.0), 5000, 1), ((4.0, 3.0, 2.0), 1500, more), ((4.0,), 5000, more)):
        monkeypatch.setattr(streaming, "STREAMED_DEVIATIONS", deviations)
        streamed, taken = select_streamed(values, ranks, chunk, room, compiled=compiled)
        assert taken == passes, (deviations, room)
        assert streamed.value(0) == torch.kthvalue(values, ranks[0] + 1).values.item()
        assert streamed.ties_before(0) == 0 and streamed.count_equal[0] == 1


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streamed_brackets_select_in_one_pass_what_the_passes_select(dtype, compiled):
    """A tensor streamed in chunks whose ranks lie inside the ranges estimated from its first chunk is selected at
    the end of one pass, with the value, ties before and count of equal elements of the histogram passes; where a
    rank lies inside none of the ranges (a first chunk unlike the rest, or ranks set after the first chunk far from
    those the ranges were made for), or the room cannot hold the ranges or fills up, the histogram passes start over
    and give the same."""
    n, chunk = 5 * GRID + 999, 20011
    g = torch.Generator().manual_seed(7)
    normal = torch.randn(n, generator=g, dtype=dtype).abs()
    skewed = normal.clone()
    skewed[:chunk] *= 1.5  # the first chunk's quantiles lie above the rest's
    cases = [  # values, room, ranks set late, passes
        (normal, n // 4, None, 1),
        (tied_magnitudes(n, 3, dtype, 100000), n // 4, None, 1),
        (tied_magnitudes(n, 4, dtype, 50), n // 2, None, 1),  # ranks among many equal values
        # all zeros: ranges too wide, then the first histogram pass finds the ranks among the zeros
        (tied_magnitudes(n, 4, dtype, 1), n, None, 2),
        (skewed, n // 4, None, 1 + RankSelect.passes_for(dtype)),
        (normal, 1000, None, 1 + RankSelect.passes_for(dtype)),
        (normal, n // 4, [0, 1, n // 3 + 10, n // 2 - 10, n - 2, n - 1], 1),  # set late, inside the ranges
        (normal, n // 4, [n // 5, n - 3, 0, n // 2, n - 1, 1], 1 + RankSelect.passes_for(dtype)),  # n // 5: outside
    ]
    ranks = [0, 1, n // 3, n // 2, n - 2, n - 1]
    for case, (values, room, late, passes) in enumerate(cases):
        final = late or ranks
        streamed, taken = select_streamed(values, ranks, chunk, room, late, compiled)
        reference = select(values, final, chunk)
        assert taken == passes, (case, taken)
        for j, rank in enumerate(final):
            assert (streamed.value(j), streamed.ties_before(j), streamed.count_equal[j]) == \
                (reference.value(j), reference.ties_before(j), reference.count_equal[j])
            assert streamed.value(j) == torch.kthvalue(values, rank + 1).values.item()
