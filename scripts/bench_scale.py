#!/usr/bin/env python3
"""Scale-out benchmark: `ties` and `dare_ties` (or `--methods`) on the three XTTS-shaped inputs, in one process,
on 2 local worker processes sharing `--ram` (1GiB), and on a Ray cluster of two nodes (one CPU each) that this
script starts on 127.0.0.1, each Ray task with the budget a local worker gets. A fourth row runs two whole
single-process merges at once: how much two processes of this work gain on this machine at best (its speed-up is
the pair's throughput), the ceiling for the split runs. Wall time is that of the whole
command (warm page cache, best of `--repeat`), peak anonymous RSS that of the command's process tree; each
run's task count, task budget and largest task peak come from its `--report`. Writes
bench-data/results-scale.{md,json}.

    python scripts/bench_scale.py [--data bench-data] [--methods ties,dare_ties] [--ram 1GiB] [--shrink N]
                                  [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synth  # noqa: E402
from bench import MIB, ROOT, measure, publish, streammerge_config, warm  # noqa: E402


def xtts_models(data_dir: Path, shrink: int = 1) -> list[Path]:
    data = data_dir / ("xtts" if shrink == 1 else f"xtts-shrink{shrink}")
    models = [data / f"model{i}.safetensors" for i in range(3)]
    if not all(p.exists() for p in models):
        print(f"generating three XTTS-v2-shaped checkpoints in {data} ({5.6 / shrink:.1f} GB, once)...",
              file=sys.stderr)
        synth.write_models(data, 3, "safetensors", shrink=shrink)
    return models


def loopback_ray_cluster():
    """A head and a second node on 127.0.0.1, one CPU each; shut down by the caller (cluster.shutdown())."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # inherited by every Ray process started from here
    from ray.cluster_utils import Cluster

    store = 100 * MIB
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                             "include_dashboard": False, "object_store_memory": store})
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", object_store_memory=store)
        cluster.wait_for_nodes(timeout=180)
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


def best_run(command: list[str], inputs: list[Path], report: Path, output: Path, repeat: int) -> dict:
    best = None
    for _ in range(repeat):
        warm(inputs)
        result = measure(command)
        facts = json.loads(report.read_text())
        result.update(task_ram_mib=facts["task_ram_bytes"] / MIB, task_peak_mib=facts["task_peak_anon_bytes"] / MIB,
                      tasks=facts["tasks"])
        best = result if best is None or result["wall_s"] < best["wall_s"] else best
        output.unlink()
    return best


def best_pair(command: list[str], inputs: list[Path], outputs: list[Path], repeat: int) -> dict:
    """Two single-process merges of the same config at once, each to its own output: what two processes of this
    work get out of this machine (its cores, memory bandwidth and disk shared), with no work split at all."""
    a, b = (shlex.join([*command, "--output", str(out)]) for out in outputs)
    best = None
    for _ in range(repeat):
        warm(inputs)
        result = measure(["sh", "-c", f"{a} & first=$!; {b} & second=$!; wait $first && wait $second"])
        result.update(task_ram_mib=0, task_peak_mib=0, tasks=0)
        best = result if best is None or result["wall_s"] < best["wall_s"] else best
        for out in outputs:
            out.unlink()
    return best


def table(rows: list[dict]) -> str:
    lines = ["| method | run | wall time (s) | speed-up vs 1 process | peak anon RSS of the command (MiB) | "
             "tasks | each task's budget (MiB) | largest task peak (MiB) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        budget = f"{r['task_ram_mib']:.0f}" if r["tasks"] else "-"
        peak = f"{r['task_peak_mib']:.0f}" if r["tasks"] else "-"
        lines.append(f"| {r['method']} | {r['run']} | {r['wall_s']:.1f} | {r['speedup']:.2f} | "
                     f"{r['peak_anon_mib']:.0f} | {r['tasks'] or '-'} | {budget} | {peak} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from streammerge.units import parse_size

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "bench-data")
    parser.add_argument("--methods", default="ties,dare_ties")
    parser.add_argument("--ram", default="1GiB", help="max_ram of the single and the 2-worker runs")
    parser.add_argument("--shrink", type=int, default=1, help="XTTS-shaped models this many times smaller")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row; the fastest is reported")
    args = parser.parse_args(argv)
    models = xtts_models(args.data, args.shrink)
    total_ram = parse_size(args.ram, "--ram")
    command = [sys.executable, "-m", "streammerge", "merge"]
    rows: list[dict] = []
    cluster = None
    try:
        with tempfile.TemporaryDirectory(dir=args.data, prefix="run-") as tmp:
            tmp = Path(tmp)
            output, report, config_path = tmp / "out.safetensors", tmp / "r.json", tmp / "sm.yaml"
            for method in args.methods.split(","):
                config = {**streammerge_config(method, models, output), "max_ram": total_ram}
                inputs = [Path(m["path"]) for m in config["models"]] + [Path(config["base"])] * ("base" in config)
                config_path.write_text(yaml.safe_dump(config))
                base = [*command, str(config_path), "--quiet", "--report", str(report)]
                one = best_run(base, inputs, report, output, args.repeat)
                pair = best_pair([*command, str(config_path), "--quiet"], inputs,
                                 [tmp / "pair-a.safetensors", tmp / "pair-b.safetensors"], args.repeat)
                two = best_run([*base, "--workers", "2"], inputs, report, output, args.repeat)
                if cluster is None:
                    cluster = loopback_ray_cluster()
                task_ram = str(int(two["task_ram_mib"] * MIB))  # Ray tasks get what a local worker got
                ray = best_run([*base, "--ray", cluster.address, "--max-ram", task_ram], inputs, report, output,
                               args.repeat)
                # The pair does the work twice: its speed-up is its throughput, 2 x one's time / its time.
                for label, run, work in (("1 process", one, 1), ("2 whole merges at once (ceiling)", pair, 2),
                                         ("2 local workers", two, 1), ("Ray, 2 nodes x 1 CPU", ray, 1)):
                    rows.append({"method": method, "run": label, **run,
                                 "speedup": work * one["wall_s"] / run["wall_s"]})
                    print(f"{method:10s} {label:22s} {run['wall_s']:7.1f} s x{rows[-1]['speedup']:.2f}",
                          file=sys.stderr)
    finally:
        if cluster is not None:
            cluster.shutdown()
    publish(args.data, "results-scale", table(rows), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
