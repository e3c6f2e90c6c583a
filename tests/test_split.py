"""The work split: groups of whole tensors, balanced by bytes read times passes, deterministic."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from streammerge.distributed.split import split_tasks, tensor_cost


def tensors(*sizes):
    return [SimpleNamespace(name=f"t{i}", read_bytes=s) for i, s in enumerate(sizes)]


def loads(tasks, groups, passes=lambda t: 0):
    return [sum(tensor_cost(tasks[i], passes(tasks[i])) for i in g) for g in groups]


def test_every_tensor_in_exactly_one_group_of_consecutive_tensors():
    tasks = tensors(5, 9, 1, 7, 3, 3, 8, 2)
    groups = split_tasks(tasks, 3, lambda t: 0)
    assert [i for g in groups for i in g] == list(range(len(tasks)))
    assert all(g == list(range(g[0], g[-1] + 1)) for g in groups)
    assert max(loads(tasks, groups)) == 14  # 38 in all; (5 9) (1 7 3 3) (8 2) is the best 3-way cut


def test_as_good_as_any_cut():
    import itertools

    tasks = tensors(4, 8, 15, 16, 23, 42, 7, 1, 9)
    best = min(max(sum(t.read_bytes for t in tasks[a:b]) for a, b in zip((0,) + cut, cut + (len(tasks),)))
               for cut in itertools.combinations(range(1, len(tasks)), 3))
    assert max(loads(tasks, split_tasks(tasks, 4, lambda t: 0))) == best


def test_balanced_by_read_bytes():
    tasks = tensors(*([10] * 12))
    assert loads(tasks, split_tasks(tasks, 4, lambda t: 0)) == [30, 30, 30, 30]
    tasks = tensors(50, 40, 30, 20, 10, 10, 10, 10)
    assert max(loads(tasks, split_tasks(tasks, 2, lambda t: 0))) == 90  # 180 in all: a perfect split


def test_passes_weigh_in():
    # t0 is read three times (two statistics passes + merge): it costs as much as the other three together.
    tasks = tensors(10, 10, 10, 10)
    passes = lambda t: 2 if t.name == "t0" else 0  # noqa: E731
    assert split_tasks(tasks, 2, passes) == [[0], [1, 2, 3]]


def test_never_more_groups_than_tensors_and_deterministic():
    tasks = tensors(3, 1, 2)
    assert split_tasks(tasks, 10, lambda t: 0) == [[0], [1, 2]]  # no cut can beat the largest tensor
    many = tensors(*[(i * 7919) % 101 for i in range(200)])
    assert split_tasks(many, 8, lambda t: 1) == split_tasks(many, 8, lambda t: 1)
    assert split_tasks([], 4, lambda t: 0) == []
    with pytest.raises(ValueError):
        split_tasks(tasks, 0, lambda t: 0)


def test_one_huge_tensor_is_never_cut():
    tasks = tensors(1000, 1, 1, 1)
    groups = split_tasks(tasks, 2, lambda t: 0)
    assert [0] in groups and len(groups) == 2
