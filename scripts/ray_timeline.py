#!/usr/bin/env python3
"""When each task of a distributed merge on Ray ends: starts a two-node Ray cluster on 127.0.0.1 (one CPU per
node, as `scripts/bench_scale.py` does), runs a merge config on it in this process and prints, in seconds from
the start, when the inputs were prepared, when the per-node file check ended, and when each task's result came
back with the task's own time and worker process.

    python scripts/ray_timeline.py CONFIG.yaml [--task-mib 437]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import loopback_ray_cluster  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--task-mib", type=int, default=437, help="each Ray task's max_ram")
    args = parser.parse_args()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from streammerge.config import parse_config
    from streammerge.config_file import read_config_file
    from streammerge.distributed import driver, executors
    from streammerge.engine import prepare

    events: list[tuple[float, str]] = []
    started = time.perf_counter()

    def log(what: str) -> None:
        events.append((time.perf_counter() - started, what))

    check, run = executors.RayCluster.check, executors.RayCluster.run

    def timed_check(self, job):
        check(self, job)
        log("every node checked the files")

    def timed_run(self, job, groups, on_result):
        def result(index, outcome):
            log(f"task {index} done: {outcome.seconds:.1f} s in pid {outcome.pid}")
            on_result(index, outcome)
        return run(self, job, groups, result)

    executors.RayCluster.check, executors.RayCluster.run = timed_check, timed_run
    cluster = loopback_ray_cluster()
    try:
        started = time.perf_counter()
        prepared = prepare(parse_config(read_config_file(args.config), args.config), None, args.task_mib * 2**20)
        log("prepared")
        driver.run_prepared(prepared, quiet=True, ray={"address": cluster.address})
        log("merge committed")
    finally:
        cluster.shutdown()
    for at, what in events:
        print(f"{at:6.1f} s  {what}")


if __name__ == "__main__":
    sys.exit(main())
