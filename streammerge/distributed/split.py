"""The work split: the plan's tensors in groups of whole tensors, balanced by the bytes each reads times the
number of times it reads them. A tensor never spans groups, so its statistics passes stay in one process.

Groups are runs of consecutive tensors (in plan order, which is file order): each task then reads its inputs and
writes its output front to back, and a shard of a sharded output is complete (and recorded for --resume) as soon
as the few tasks that hold its tensors are done."""

from __future__ import annotations

from typing import Callable, Sequence

from streammerge.plan import TensorTask


def tensor_cost(task: TensorTask, reads: int) -> int:
    """What merging `task` costs: its input bytes, `reads` times over."""
    return task.read_bytes * reads


def split_tasks(tasks: Sequence[TensorTask], groups: int, reads: Callable[[TensorTask], int],
                finer_tail: int = 0) -> list[list[int]]:
    """At most `groups` non-empty runs of consecutive indices into `tasks`, the largest run's cost as small as it
    can be (the linear partition problem: binary search on that cost, greedy runs under it). With `finer_tail`,
    the last that many runs are then each cut in two: run in order, the workers that finish first find half-size
    pieces at the end, and the last one to finish holds the end up by about half as long."""
    if groups < 1:
        raise ValueError("groups must be at least 1")
    costs = [max(1, tensor_cost(t, reads(t))) for t in tasks]
    runs = _partition(costs, groups)
    cut = len(runs) - min(finer_tail, len(runs))
    return runs[:cut] + [[run[i] for i in half] for run in runs[cut:]
                         for half in _partition([costs[i] for i in run], 2)]


def _partition(costs: list[int], groups: int) -> list[list[int]]:
    if not costs:
        return []
    low, high = max(costs), sum(costs)
    while low < high:
        limit = (low + high) // 2
        if len(_runs(costs, limit)) <= groups:
            high = limit
        else:
            low = limit + 1
    return _runs(costs, low)


def _runs(costs: list[int], limit: int) -> list[list[int]]:
    runs: list[list[int]] = [[]]
    load = 0
    for i, cost in enumerate(costs):
        if runs[-1] and load + cost > limit:
            runs.append([])
            load = 0
        runs[-1].append(i)
        load += cost
    return runs
