"""The work split: groups of whole tensors, balanced by the bytes each reads times how often, deterministic."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from streammerge.distributed.split import split_tasks, tensor_cost


def tensors(*sizes):
    return [SimpleNamespace(name=f"t{i}", read_bytes=s) for i, s in enumerate(sizes)]


def loads(tasks, groups, reads=lambda t: 1):
    return [sum(tensor_cost(tasks[i], reads(tasks[i])) for i in g) for g in groups]


def test_every_tensor_in_exactly_one_group_of_consecutive_tensors():
    tasks = tensors(5, 9, 1, 7, 3, 3, 8, 2)
    groups = split_tasks(tasks, 3, lambda t: 1)
    assert [i for g in groups for i in g] == list(range(len(tasks)))
    assert all(g == list(range(g[0], g[-1] + 1)) for g in groups)
    assert max(loads(tasks, groups)) == 14  # 38 in all; (5 9) (1 7 3 3) (8 2) is the best 3-way cut


def test_as_good_as_any_cut():
    import itertools

    tasks = tensors(4, 8, 15, 16, 23, 42, 7, 1, 9)
    best = min(max(sum(t.read_bytes for t in tasks[a:b]) for a, b in zip((0,) + cut, cut + (len(tasks),)))
               for cut in itertools.combinations(range(1, len(tasks)), 3))
    assert max(loads(tasks, split_tasks(tasks, 4, lambda t: 1))) == best


def test_balanced_by_read_bytes():
    tasks = tensors(*([10] * 12))
    assert loads(tasks, split_tasks(tasks, 4, lambda t: 1)) == [30, 30, 30, 30]
    tasks = tensors(50, 40, 30, 20, 10, 10, 10, 10)
    assert max(loads(tasks, split_tasks(tasks, 2, lambda t: 1))) == 90  # 180 in all: a perfect split


def test_reads_weigh_in():
    # t0 is read three times (two statistics passes + merge): it costs as much as the other three together.
    tasks = tensors(10, 10, 10, 10)
    reads = lambda t: 3 if t.name == "t0" else 1  # noqa: E731
    assert split_tasks(tasks, 2, reads) == [[0], [1, 2, 3]]


def test_a_tensor_larger_than_a_tasks_chunk_costs_its_statistics_passes(tmp_path):
    """The cost the driver gives each tensor: one read when the whole tensor fits in the chunk of the task's
    budget (its statistics come from that chunk), one more per statistics pass when it does not; a copy is read
    once whatever its size."""
    import torch
    from helpers import save

    from streammerge.config import parse_config
    from streammerge.engine import input_reads, prepare, statistics_passes

    models = [save({"big": torch.randn(4096, 64), "small": torch.randn(64), "count": torch.tensor(3)},
                   tmp_path / f"m{i}.safetensors") for i in range(3)]
    config = parse_config({"method": "ties", "base": str(models[0]), "output": str(tmp_path / "out.safetensors"),
                           "models": [{"path": str(p), "density": 0.5, "weight": 0.5} for p in models[1:]]})
    tasks = {t.name: t for t in prepare(config).plan.tasks}
    passes = statistics_passes(config, tasks["big"])
    assert passes >= 1 and statistics_passes(config, tasks["count"]) == 0
    assert input_reads(config, tasks["big"], chunk=4096 * 64) == 1
    # larger than the chunk: its magnitudes gathered in ties' 7 chunk-sized buffers where both models' fit, else
    # bracketed: one statistics read either way, against one per radix pass
    assert input_reads(config, tasks["big"], chunk=4096 * 64 - 1) == 2
    assert input_reads(config, tasks["big"], chunk=65536) == 2 < passes + 1
    assert input_reads(config, tasks["small"], chunk=4096) == 1
    assert input_reads(config, tasks["count"], chunk=1) == 1


def test_never_more_groups_than_tensors_and_deterministic():
    tasks = tensors(3, 1, 2)
    assert split_tasks(tasks, 10, lambda t: 1) == [[0], [1, 2]]  # no cut can beat the largest tensor
    many = tensors(*[(i * 7919) % 101 for i in range(200)])
    assert split_tasks(many, 8, lambda t: 2) == split_tasks(many, 8, lambda t: 2)
    assert split_tasks([], 4, lambda t: 1) == []
    with pytest.raises(ValueError):
        split_tasks(tasks, 0, lambda t: 1)


def test_one_huge_tensor_is_never_cut():
    tasks = tensors(1000, 1, 1, 1)
    groups = split_tasks(tasks, 2, lambda t: 1)
    assert [0] in groups and len(groups) == 2


def test_a_finer_tail_cuts_the_last_runs_in_two():
    tasks = tensors(*([10] * 16))
    assert split_tasks(tasks, 4, lambda t: 1, finer_tail=2) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11],
                                                                 [12, 13], [14, 15]]
    uneven = tensors(5, 9, 1, 7, 3, 3, 8, 2, 6)
    groups = split_tasks(uneven, 3, lambda t: 1, finer_tail=3)
    assert [i for g in groups for i in g] == list(range(len(uneven))) and all(groups)
    assert split_tasks(tensors(100, 1), 2, lambda t: 1, finer_tail=2) == [[0], [1]]  # a run of one stays whole
    assert split_tasks(tasks, 4, lambda t: 1, finer_tail=9) == [[i, i + 1] for i in range(0, 16, 2)]
