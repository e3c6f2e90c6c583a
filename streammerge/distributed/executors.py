"""Where the tasks of a distributed merge run: local worker processes (`--workers N`) or a Ray cluster
(`--ray [ADDRESS]`). Both take the same tasks and report each task's result as it completes; on any failure or
interrupt they stop the tasks still running before the driver removes the partial output."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Protocol

from streammerge.distributed.task import (
    Group,
    GroupResult,
    MergeJob,
    check_same_files,
    run_group,
    worker_baseline,
)
from streammerge.errors import MemoryBudgetError, StreamMergeError
from streammerge.units import format_size

OnResult = Callable[[int, GroupResult], None]
RAY_RUNTIME_RESERVE = 48 * 1024**2
RAY_INSTALL = "pip install 'streammerge[ray]'  (or: pip install 'ray[default]')"


class Executor(Protocol):
    slots: int  # how many tasks run at once (the split makes a few times as many groups)
    describe: str
    # Whether each task fsyncs what it wrote before it reports. Tasks on other machines must: the driver's
    # fsync at commit cannot reach their page caches. Local workers share this machine's page cache, which the
    # driver's fsync of each file flushes, so a task's own fsync would only make it wait for the disk.
    tasks_sync: bool
    task_reserve: int  # bytes of each task's budget left to the process that runs it, beyond the merge's margin

    def task_ram(self, max_ram: int, driver_anon: int, working_minimum: int) -> int: ...

    def check(self, job: MergeJob) -> None: ...

    def run(self, job: MergeJob, groups: list[Group], on_result: OnResult) -> None: ...

    def stop(self) -> None: ...  # stop every task now (after a failure or an interrupt)

    def close(self) -> None: ...


def _worker_started() -> None:
    # The driver handles Ctrl-C for everyone: it stops the workers, then removes the partial output. A forked
    # worker would also inherit the driver's handlers for the other signals: it just ends on them instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def worker_start_method(driver_anon: int, share: int) -> str:
    """`fork` while this process runs no other Python thread and holds at most half a worker's share of memory:
    the workers then start at once with the modules the driver has loaded (a spawned worker imports torch again,
    seconds of one core before it merges anything). Otherwise `spawn`: with other threads running (an embedding
    application, Ray's client) a forked child could inherit a lock one of them holds, and a forked child's
    anonymous memory starts at the driver's, all of it counted against the worker's share."""
    return "fork" if threading.active_count() == 1 and driver_anon <= share // 2 else "spawn"


class LocalWorkers:
    """N worker processes on this machine sharing `max_ram`: each gets (max_ram - what the driver holds) / N."""

    def __init__(self, workers: int):
        self.slots = workers
        self.describe = f"{workers} local worker processes"
        self.tasks_sync = False
        self.task_reserve = 0  # a worker process runs nothing but the merge
        self.pool: ProcessPoolExecutor | None = None

    def task_ram(self, max_ram: int, driver_anon: int, working_minimum: int) -> int:
        """Each worker's share of `max_ram`; it must cover what a worker process holds before it merges (measured
        in the workers themselves) plus `working_minimum`."""
        share = (max_ram - driver_anon) // self.slots
        # Every worker runs the same code: one measures for all (the pool starts the others as tasks come).
        baseline = self._started(worker_start_method(driver_anon, share)).submit(worker_baseline).result()
        minimum = baseline + working_minimum
        if share < minimum:
            raise MemoryBudgetError(
                f"--workers {self.slots}: each worker gets {format_size(share)} of max_ram={format_size(max_ram)} "
                f"(after the {format_size(driver_anon)} the driver holds), but a worker needs at least "
                f"{format_size(minimum)}. Raise max_ram to at least {format_size(driver_anon + self.slots * minimum)}"
                " or use fewer workers.")
        return share

    def _started(self, start_method: str = "spawn") -> ProcessPoolExecutor:
        if self.pool is None:  # kept for the next merge (a sweep) until close()
            self.pool = ProcessPoolExecutor(self.slots, mp_context=multiprocessing.get_context(start_method),
                                            initializer=_worker_started)
        return self.pool

    def check(self, job: MergeJob) -> None:
        pass  # same machine, same files

    def run(self, job: MergeJob, groups: list[Group], on_result: OnResult) -> None:
        pool = self._started()
        futures = {pool.submit(run_group, job, g): i for i, g in enumerate(groups)}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    on_result(futures[future], future.result())
        except BrokenProcessPool:
            self.stop()
            raise StreamMergeError(
                "a worker process died (killed, or out of memory) while merging; nothing was written to the output "
                "path. Rerun; if it happens again, lower max_ram or use fewer workers.") from None
        except BaseException:
            self.stop()  # the other tasks would only write into files the driver is about to remove
            raise

    def stop(self) -> None:
        """Stop every worker now (our own child processes, by PID) and wait for them."""
        if self.pool is None:
            return
        for process in list(getattr(self.pool, "_processes", {}).values()):
            if process.is_alive():
                process.kill()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = None

    def close(self) -> None:
        self.stop()


class RayCluster:
    """The tasks as Ray tasks: one CPU each, and their RAM budget as Ray's `memory` resource, so Ray never places
    more tasks on a node than its memory holds. A task whose worker dies is retried (`max_retries`)."""

    CHECK_TIMEOUT = 120

    def __init__(self, address: str | None = None, max_retries: int = 3):
        try:
            import ray
        except ImportError:
            raise StreamMergeError(f"--ray needs Ray, which is not installed: {RAY_INSTALL}. Or run without --ray "
                                   "(--workers N uses the cores of this machine).") from None
        self.ray = ray
        self.max_retries = max_retries
        self.tasks_sync = True
        # A Ray worker's own runtime (its threads, the buffers of task arguments and results) grows while a task
        # runs: with only the merge's usual margin, a 437 MiB task on the XTTS-shaped set went 0.8 MiB over.
        self.task_reserve = RAY_RUNTIME_RESERVE
        self.started_here = not ray.is_initialized()
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, logging_level="ERROR",
                     configure_logging=True)
        except Exception as exc:  # noqa: BLE001 - Ray raises many kinds; all mean: no cluster there
            where = address or os.environ.get("RAY_ADDRESS") or "a local instance"
            raise StreamMergeError(
                f"cannot connect to the Ray cluster at {where}: {exc}. Start one with `ray start --head` (and "
                "`ray start --address HEAD:PORT` on the other machines), then pass --ray auto or --ray HOST:PORT."
            ) from None
        self.pending: list = []
        self.refresh()

    def refresh(self) -> None:
        """The cluster as it is now (nodes join and leave)."""
        self.nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        self.slots = max(1, int(sum(n["Resources"].get("CPU", 0) for n in self.nodes)))
        self.describe = f"a Ray cluster of {len(self.nodes)} node(s), {self.slots} CPU(s)"

    def task_ram(self, max_ram: int, driver_anon: int, working_minimum: int) -> int:
        self.refresh()
        largest = max((n["Resources"].get("memory", 0) for n in self.nodes), default=0)
        if max_ram > largest:
            raise MemoryBudgetError(
                f"--ray: each task's budget max_ram={format_size(max_ram)} is more than any node of the cluster "
                f"offers (the largest Ray `memory` resource is {format_size(int(largest))}); lower max_ram.")
        return max_ram

    def check(self, job: MergeJob) -> None:
        """Each node stats the inputs and the output files: all must see what the driver sees."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        remote = self.ray.remote(check_same_files)
        refs = [remote.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(job) for n in self.nodes]
        self._gather(refs, timeout=self.CHECK_TIMEOUT, what="checking that every node sees the files")

    def run(self, job: MergeJob, groups: list[Group], on_result: OnResult) -> None:
        remote = self.ray.remote(run_group).options(num_cpus=1, memory=job.task_ram, max_retries=self.max_retries,
                                                    retry_exceptions=False)
        job_ref = self.ray.put(job)
        refs = {remote.remote(job_ref, g): i for i, g in enumerate(groups)}
        self.pending = list(refs)
        try:
            while self.pending:
                done, self.pending = self.ray.wait(self.pending, num_returns=1)
                for ref in done:
                    on_result(refs[ref], self._get(ref))
        finally:
            self.stop()

    def _get(self, ref):
        from ray.exceptions import RayError, RayTaskError

        try:
            return self.ray.get(ref)
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, StreamMergeError):
                raise cause from None
            raise StreamMergeError(f"a Ray task failed: {cause or exc}") from None
        except RayError as exc:
            raise StreamMergeError(
                f"a Ray task could not finish after {self.max_retries} retries ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); nothing was written to the output path. Check "
                "the nodes (memory, disk), then rerun.") from None

    def _gather(self, refs, timeout: float, what: str) -> None:
        done, pending = self.ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if pending:
            self.pending = pending  # cancelled by stop()
            raise StreamMergeError(f"--ray: {len(pending)} node(s) did not answer within {timeout:.0f} s while "
                                   f"{what}; check the cluster (`ray status`).")
        for ref in done:
            self._get(ref)

    def stop(self) -> None:
        """Cancel the tasks still running (their writes go to temporary files the driver then removes)."""
        pending, self.pending = self.pending, []
        for ref in pending:
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone
                pass
        if pending:
            self.ray.wait(pending, num_returns=len(pending), timeout=30)

    def close(self) -> None:
        self.stop()
        self.ray.shutdown()
