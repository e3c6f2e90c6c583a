#!/usr/bin/env python3
"""Linear merge on the three XTTS-shaped inputs against its two yardsticks:
- mergekit, warm page cache: `--pairs` alternating runs (streammerge, then mergekit), the median of the ratios;
- the I/O floor inside a memory cgroup of `--cgroup` (512MiB), cold page cache: streammerge against reading the
  inputs and writing + fsyncing an output of the same size, one after the other, in the same cgroup (root only);
  beside it the same I/O with the write overlapping the reads, the merge alone and the start-up alone.
Writes bench-data/results-linear.{md,json}.

    python scripts/bench_linear.py [--data bench-data] [--pairs 3] [--cgroup 512MiB] [--repeat 3] [--mergekit PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (  # noqa: E402
    ROOT,
    drop_caches,
    find_mergekit,
    measure,
    mergekit_config,
    publish,
    streammerge_config,
    warm,
)
from bench_scale import xtts_models  # noqa: E402


@contextlib.contextmanager
def memory_cgroup(limit: int):
    """A memory cgroup of `limit` bytes under this process's own (v1 or v2), removed afterwards."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            parent, limit_file = Path("/sys/fs/cgroup/memory") / rel.lstrip("/"), "memory.limit_in_bytes"
            break
        if line.startswith("0::"):
            parent, limit_file = Path("/sys/fs/cgroup") / rel.lstrip("/"), "memory.max"
    path = parent / f"streammerge-bench-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        (path / limit_file).write_text(str(limit))
        yield path
    finally:
        path.rmdir()


def in_cgroup(cgroup: Path, command: list[str]) -> list[str]:
    return ["sh", "-c", f"echo $$ > {shlex.quote(str(cgroup / 'cgroup.procs'))} && exec {shlex.join(command)}"]


def main(argv=None) -> int:
    from streammerge.units import parse_size

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "bench-data")
    parser.add_argument("--pairs", type=int, default=3, help="alternating streammerge/mergekit runs, warm")
    parser.add_argument("--cgroup", default="512MiB", help="memory limit of the cgroup for the cold runs")
    parser.add_argument("--repeat", type=int, default=3, help="cold runs of each (streammerge, floor); best kept")
    parser.add_argument("--max-ram", default="256MiB", help="streammerge's budget")
    parser.add_argument("--mergekit", help="path to mergekit-pytorch (default: .venv-mergekit, then PATH)")
    args = parser.parse_args(argv)
    models = xtts_models(args.data)
    mergekit = find_mergekit(args.mergekit)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.data, prefix="run-") as tmp:
        tmp = Path(tmp)
        out, mk_out = tmp / "out.safetensors", tmp / "mk-out"
        (tmp / "sm.yaml").write_text(yaml.safe_dump(streammerge_config("linear", models, out, None, args.max_ram)))
        streammerge = [sys.executable, "-m", "streammerge", "merge", str(tmp / "sm.yaml"), "--quiet"]

        def timed(command: list[str], cold: bool) -> float:
            drop_caches() if cold else warm(models)
            wall = measure(command)["wall_s"]
            with contextlib.suppress(FileNotFoundError):
                out.unlink()
            if mk_out.exists():
                for f in mk_out.iterdir():
                    f.unlink()
                mk_out.rmdir()
            return wall

        if mergekit:
            (tmp / "mk.yaml").write_text(yaml.safe_dump(mergekit_config("linear", models)))
            mk = [mergekit, str(tmp / "mk.yaml"), str(mk_out), "--quiet"]
            pairs = [(timed(streammerge, False), timed(mk, False)) for _ in range(args.pairs)]
            ratio = statistics.median(s / m for s, m in pairs)
            rows.append({"what": f"streammerge / mergekit, warm, median of {args.pairs} alternating pairs",
                         "streammerge_s": [round(s, 2) for s, _ in pairs], "other_s": [round(m, 2) for _, m in pairs],
                         "ratio": ratio})
        else:
            print("mergekit-pytorch not found (`make mergekit`): no mergekit comparison", file=sys.stderr)
        if drop_caches():
            with memory_cgroup(parse_size(args.cgroup, "--cgroup")) as cgroup:
                def floor_cmd(overlapped: bool) -> list[str]:
                    return [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from bench import "
                            "io_floor; from pathlib import Path; print(io_floor([Path(p) for p in sys.argv[5:]], "
                            "int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == 'overlapped'))",
                            str(Path(__file__).resolve().parent), str(models[0].stat().st_size), str(tmp),
                            "overlapped" if overlapped else "in turn", *map(str, models)]
                report = tmp / "report.json"
                mine, merging = [], []
                for _ in range(args.repeat):
                    mine.append(timed(in_cgroup(cgroup, [*streammerge, "--report", str(report)]), True))
                    merging.append(json.loads(report.read_text())["seconds"])
                # start-up alone: the interpreter and the imports, cold (torch's libraries are read from disk too)
                starting = [timed(in_cgroup(cgroup, [sys.executable, "-c", "import streammerge.cli"]), True)
                            for _ in range(args.repeat)]
                # The floor's own timing (io_floor drops the caches first), without its interpreter's start.
                floors, overlapped = ([float(subprocess.run(in_cgroup(cgroup, floor_cmd(o)), check=True,
                                                            capture_output=True, text=True).stdout.split()[-1])
                                        for _ in range(args.repeat)] for o in (False, True))
            rows.append({"what": f"streammerge / I/O floor, cold, in a {args.cgroup} memory cgroup (best of "
                                 f"{args.repeat} each)",
                         "streammerge_s": [round(s, 2) for s in mine], "other_s": [round(f, 2) for f in floors],
                         "ratio": min(mine) / min(floors)})
            rows.append({"what": "streammerge's merge alone (the report's `seconds`: first read to committed output) "
                                 "/ I/O floor, same runs", "streammerge_s": [round(s, 2) for s in merging],
                         "other_s": [round(f, 2) for f in floors], "ratio": min(merging) / min(floors)})
            rows.append({"what": "the I/O floor with the output written while the inputs are read (a second thread) "
                                 "/ I/O floor, same cgroup", "streammerge_s": [round(f, 2) for f in overlapped],
                         "other_s": [round(f, 2) for f in floors], "ratio": min(overlapped) / min(floors)})
            rows.append({"what": "start-up alone (`python -c \"import streammerge.cli\"`), cold, same cgroup / I/O "
                                 "floor", "streammerge_s": [round(s, 2) for s in starting],
                         "other_s": [round(f, 2) for f in floors], "ratio": min(starting) / min(floors)})
        else:
            print("not root: no cold runs in a cgroup", file=sys.stderr)
    lines = ["| comparison | measured (s) | against (s) | ratio |", "|---|---|---|---:|"]
    lines += [f"| {r['what']} | {', '.join(map(str, r['streammerge_s']))} | {', '.join(map(str, r['other_s']))} | "
              f"{r['ratio']:.2f} |" for r in rows]
    publish(args.data, "results-linear", "\n".join(lines), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
