"""The driver of a distributed merge: create the output files, split the plan, run the tasks on an executor,
feed their checksums to the output and commit it exactly as a single-process run does, only when every task
succeeded. Any failure or interrupt stops the tasks and leaves the output path as it was."""

from __future__ import annotations

import os
import time

from tqdm import tqdm

from streammerge.distributed.executors import Executor
from streammerge.distributed.split import split_tasks
from streammerge.distributed.task import Group, GroupResult, MergeJob, Placement
from streammerge.engine import Engine, Prepared, Report, input_reads
from streammerge.errors import OutputError
from streammerge.interrupts import uninterruptible
from streammerge.io.output_safety import check_output_is_not_an_input, input_paths
from streammerge.io.output_spec import Output
from streammerge.io.outputs import check_disk_space, make_output
from streammerge.memory import MemoryGuard, anon_rss

# Several groups per slot: the slots that finish first take the groups left, so the last group to finish
# holds up the end by little (a task's set-up is paid once per process and merge, not per group).
GROUPS_PER_SLOT = 8


def create_full_size(output: Output) -> None:
    """Create the output's temporary files with their headers, each at its final size, before any task writes
    (the disk space is taken now, and every task writes into a file that is already there)."""
    output.create_files()
    for file in output.spec.files:
        try:
            if file.temporary.exists():
                os.truncate(file.temporary, file.size)
        except OSError as exc:
            raise OutputError(f"cannot create '{file.temporary}' at its full size ({exc.strerror}); free some space "
                              "or choose another output location.") from None


def run_distributed(prepared: Prepared, executor: Executor, quiet: bool = False, allow_nonfinite: bool | None = None,
                    resume: bool = False) -> Report:
    config, plan, budget = prepared.config, prepared.plan, prepared.budget
    engine = Engine(prepared, quiet=quiet, allow_nonfinite=allow_nonfinite, resume=resume)
    output = make_output(engine.spec, resume=resume)
    check_output_is_not_an_input(output.files, prepared.output, prepared.inputs, also=(config.source,))
    # What a merge needs beyond the process's own baseline (a worker measures its own).
    task_ram = executor.task_ram(budget.limit, anon_rss(), budget.minimum - budget.baseline)
    started = time.perf_counter()
    results: list[GroupResult] = []
    with MemoryGuard(budget.limit) as guard:
        engine.verify_non_float(plan.tasks)  # before the output exists
        progress = tqdm(total=plan.read_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="merging",
                        disable=not engine.show_progress, dynamic_ncols=True)
        try:
            output.open()  # removes an interrupted run's debris, or verifies what it completed (resume)
            check_disk_space(prepared.output, output.space_needed)
            create_full_size(output)
            # A tied tensor whose source an interrupted run already wrote is copied here; every other tensor is
            # written by the task that merges its source.
            for task in plan.tasks:
                if output.reused(task.name):
                    for alias in task.aliases:
                        if not output.reused(alias):
                            output.copy(task.name, alias, engine.chunk * task.out_dtype.itemsize)
            todo = [t for t in plan.tasks if not output.reused(t.name)]
            progress.update(plan.read_bytes - sum(t.read_bytes for t in todo))
            # Balanced by what each tensor reads in a task: chunks sized for the task's budget, not the driver's.
            task_chunk = budget.chunk_at(task_ram, budget.baseline, executor.task_reserve)
            split = split_tasks(todo, executor.slots * GROUPS_PER_SLOT, lambda t: input_reads(config, t, task_chunk),
                                finer_tail=executor.slots)
            groups = [Group(tuple(todo[i].name for i in members),
                            frozenset(a for i in members for a in todo[i].aliases if output.reused(a)))
                      for members in split]
            group_bytes = [sum(todo[i].read_bytes for i in members) for members in split]
            job = MergeJob.of(config, prepared.output, task_ram, engine.allow_nonfinite,
                              {n: p for n, p in Placement.all_of(output.spec).items() if not output.reused(n)},
                              input_paths(prepared.inputs), sync=executor.tasks_sync,
                              checksums=output.keeps_checksums, reserve=executor.task_reserve)
            executor.check(job)

            def on_result(index: int, result: GroupResult) -> None:
                for name, crc in result.checksums.items():
                    output.record_checksum(name, crc)
                results.append(result)
                progress.update(group_bytes[index])

            if groups:
                executor.run(job, groups, on_result)
            output.commit()
        except BaseException:
            with uninterruptible():  # a second Ctrl-C must not cut the cleanup short
                executor.stop()  # no task writes any more; the executor stays usable (a sweep goes on)
                output.abort()
            raise
        finally:
            progress.close()
    order = {t.name: i for i, t in enumerate(plan.tasks)}
    nonfinite = sorted({n for r in results for n in r.nonfinite}, key=order.__getitem__)
    return Report(
        output=str(prepared.output), files=[str(f) for f in output.files], tensors=len(plan.entries),
        read_bytes=sum(r.read_bytes for r in results), written_bytes=output.total_size,
        seconds=time.perf_counter() - started, peak_anon_bytes=guard.peak, max_ram_bytes=budget.limit,
        chunk_elements=0, nonfinite_tensors=nonfinite, reused_files=list(output.reused_files),
        notes=list(output.notes), executor=executor.describe, tasks=len(results),
        task_ram_bytes=task_ram, task_peak_anon_bytes=max((r.peak_anon_bytes for r in results), default=0))


def make_executor(workers: int | str = 1, ray: dict | None = None) -> Executor | None:
    """The executor for `workers` local processes or a Ray cluster; None for the plain single-process run."""
    from streammerge.cpu import usable_cores
    from streammerge.distributed.executors import LocalWorkers, RayCluster

    if ray is not None:
        return RayCluster(ray.get("address"), ray.get("max_retries", 3))
    count = usable_cores() if workers == "auto" else int(workers)
    return LocalWorkers(count) if count > 1 else None


def run_prepared(prepared: Prepared, quiet: bool = False, allow_nonfinite: bool | None = None, resume: bool = False,
                 workers: int | str | None = None, ray: dict | None = None) -> Report:
    """Run a prepared merge in this process, or spread over `workers` / `ray` (default: the config's keys)."""
    if workers is None and ray is None:
        workers, ray = prepared.config.workers, prepared.config.ray
    executor = make_executor(workers or 1, ray)
    if executor is None:
        return Engine(prepared, quiet=quiet, allow_nonfinite=allow_nonfinite, resume=resume).run()
    try:
        return run_distributed(prepared, executor, quiet=quiet, allow_nonfinite=allow_nonfinite, resume=resume)
    finally:
        executor.close()

