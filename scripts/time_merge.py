"""Where one merge's time goes: the seconds spent in the engine's statistics calls (for tensors held whole and for
tensors streamed in chunks) and in its merge calls, beside the whole merge, for one config.

    python scripts/time_merge.py CONFIG [--max-ram SIZE] [--time MODULE:NAME ...] [--by-shape]

`--time` times a function or method of the package too (`streammerge.methods.streaming:StreamedBrackets.observe`),
each call's wall time summed under its name. `--by-shape` sums the time of each tensor merged on its own
(`Engine.run_task`: its statistics passes and merge, reads included) by the tensor's shape, with the number of such
tensors; runs of small tensors merged together are not in it.

The README's "timers around the engine's calls" figures come from this, run from a worktree of each commit in
turn (`PYTHONPATH=<worktree> python scripts/time_merge.py CONFIG`), with the inputs read into the page cache first
(the merge drops from the cache what it found uncached: `cat` the inputs before each run). The merge calls of a
method that runs its steps on the merge's threads include the wait for them.
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import sys
import time

from streammerge import engine

SECONDS: collections.Counter = collections.Counter()
TENSORS: collections.Counter = collections.Counter()  # tensors behind each `--by-shape` label
TIMED = {"_statistics_in_memory": "statistics (tensors held whole)", "_observe": "statistics (streamed chunks)",
         "_merge": "merge"}


def timed(label: str, method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            SECONDS[label] += time.perf_counter() - start
    return wrapper


def by_shape(run_task):
    @functools.wraps(run_task)
    def wrapper(self, task, *args, **kwargs):
        start = time.perf_counter()
        try:
            return run_task(self, task, *args, **kwargs)
        finally:
            label = f"tensors of shape {list(task.shape)}"
            SECONDS[label] += time.perf_counter() - start
            TENSORS[label] += 1
    return wrapper


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--max-ram", help="the merge's --max-ram (default: the config's)")
    parser.add_argument("--time", action="append", default=[], metavar="MODULE:NAME",
                        help="also time this function or Class.method (repeatable)")
    parser.add_argument("--by-shape", action="store_true",
                        help="also sum the time of each tensor merged on its own by the tensor's shape")
    args = parser.parse_args(argv)
    for name, label in TIMED.items():
        setattr(engine.Engine, name, timed(label, getattr(engine.Engine, name)))
    if args.by_shape:
        engine.Engine.run_task = by_shape(engine.Engine.run_task)
    for target in args.time:
        module, _, qualified = target.partition(":")
        *path, name = qualified.split(".")
        owner = importlib.import_module(module)
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, name, timed(qualified, getattr(owner, name)))
    from streammerge.cli import main as cli
    start = time.perf_counter()
    code = cli(["merge", args.config, "--quiet", *(["--max-ram", args.max_ram] if args.max_ram else [])])
    SECONDS["the whole command, from the CLI's start"] = time.perf_counter() - start
    for label, seconds in sorted(SECONDS.items(), key=lambda item: -item[1]):
        print(f"{seconds:8.2f} s  {label}" + (f" ({TENSORS[label]})" if label in TENSORS else ""))
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
