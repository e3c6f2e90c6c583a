#!/usr/bin/env python3
"""Benchmark: three XTTS-v2-shaped checkpoints (1.87 GB each, random weights) merged by streammerge, by the
naive all-in-RAM approach, and by mergekit-pytorch when it is installed.

Wall time is that of the whole command; peak anonymous RSS is sampled every 5 ms from /proc (the process and
its children); GB/s is input bytes over wall time. "warm" runs read inputs from a warm page cache; "cold" runs
drop the page cache first (root only) and are compared with the time to read the inputs and durably write an
output of the same size. Every run starts with no dirty data pending (sync), so no tool pays for the previous
one's writeback.

    python scripts/bench.py [--data bench-data] [--methods linear,ties,...] [--cold] [--mergekit PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import synth  # noqa: E402

WEIGHTS = [0.5, 0.3, 0.2]
MIB = 1024**2
# Each method runs on the three models as its declaration says: methods that need a base merge model1 and
# model2 (only model1 if they take one) onto model0; two-model methods take model0 and model1; with the parameters of its `typical` use.


def anon_rss_tree(pid: int) -> int:
    """RssAnon of a process and all its descendants."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        total += int(line.split()[1]) * 1024
                        break
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            stack.extend(int(c) for c in children)
        except OSError:
            continue
    return total


def measure(command: list[str], env=None) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, anon_rss_tree(proc.pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-2000:]}")
    return {"wall_s": wall, "peak_anon_mib": peak / MIB}


def warm(paths) -> None:
    os.sync()  # no writeback left over from the previous run competes with this one
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 * MIB):
                pass


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def io_floor(inputs: list[Path], out_bytes: int, out_dir: Path) -> float:
    """Seconds to read the inputs cold and write + fsync an output of `out_bytes`."""
    drop_caches()
    start = time.perf_counter()
    for p in inputs:
        with open(p, "rb", buffering=0) as f:
            while f.read(16 * MIB):
                pass
    block = b"\0" * (16 * MIB)
    target = out_dir / "io-floor.bin"
    with open(target, "wb", buffering=0) as f:
        written = 0
        while written < out_bytes:
            written += f.write(block[:min(len(block), out_bytes - written)])
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    target.unlink()
    return elapsed


def streammerge_config(method: str, models: list[Path], output: Path) -> dict:
    from streammerge.methods.registry import get_method

    declared = get_method(method)
    extra = declared.typical
    base = None
    if declared.needs_base:
        base, merged, weights = models[0], models[1:1 + (declared.max_models or 2)], [0.5, 0.5]
    elif declared.max_models == 2:
        merged, weights = models[:2], [0.6, 0.4]
    elif declared.max_models == 1:
        merged, weights = models[:1], [1.0]
    else:
        merged, weights = models, WEIGHTS
    takes_weight = declared.param("weight") is not None
    config = {"output": str(output), "method": method, "max_ram": "256MiB",
              "models": [{"path": str(p), **({"weight": w} if takes_weight else {}), **extra.get("model", {})}
                         for p, w in zip(merged, weights)]}
    if base is not None:
        config["base"] = str(base)
    if "parameters" in extra:
        config["parameters"] = extra["parameters"]
    return config


def mergekit_config(method: str, models: list[Path]) -> dict:
    """The same merge as a mergekit YAML (slerp-style methods name their first model as the base)."""
    config = streammerge_config(method, models, Path("unused"))
    out = {"merge_method": method, "dtype": "float32",
           "models": [{"model": m["path"], "parameters": {k: v for k, v in m.items() if k != "path"}}
                      for m in config["models"]]}
    if "base" in config:
        out["base_model"] = config["base"]
        out["models"].append({"model": config["base"]})
    elif method == "slerp":
        out["base_model"] = config["models"][0]["path"]
    if "parameters" in config:
        out["parameters"] = config["parameters"]
    return out


def find_mergekit(explicit: str | None) -> str | None:
    for candidate in (explicit, os.environ.get("MERGEKIT_PYTORCH"), str(ROOT / ".venv-mergekit/bin/mergekit-pytorch"),
                      shutil.which("mergekit-pytorch")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "bench-data")
    parser.add_argument("--methods", default="linear", help="comma-separated methods, or 'all'")
    parser.add_argument("--cold", action="store_true", help="also run streammerge with a cold page cache (root)")
    parser.add_argument("--no-naive", action="store_true", help="skip the all-in-RAM approach")
    parser.add_argument("--mergekit", help="path to mergekit-pytorch (default: .venv-mergekit, then PATH)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row; the fastest is reported")
    args = parser.parse_args(argv)

    from streammerge.methods.registry import methods as registered

    METHODS = {m.name: m for m in registered()}

    data = args.data / "xtts"
    models = [data / f"model{i}.safetensors" for i in range(3)]
    if not all(p.exists() for p in models):
        print(f"generating three XTTS-v2-shaped checkpoints in {data} (5.6 GB, once)...", file=sys.stderr)
        synth.write_models(data, 3, "safetensors", shrink=1)
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    mergekit = find_mergekit(args.mergekit)
    streammerge = [sys.executable, "-m", "streammerge"]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.data, prefix="run-") as tmp:
        tmp = Path(tmp)

        def run(tool: str, method: str, cache: str, command: list[str], inputs: list[Path], output: Path):
            best = None
            for _ in range(args.repeat):
                if cache == "cold":
                    drop_caches()
                else:
                    warm(inputs)
                try:
                    result = measure(command)
                except RuntimeError as exc:
                    print(f"{tool} {method}: {exc}", file=sys.stderr)
                    return
                best = result if best is None or result["wall_s"] < best["wall_s"] else best
            size = sum(p.stat().st_size for p in inputs)
            rows.append({"tool": tool, "method": method, "cache": cache, **best, "gb_per_s": size / 1e9 / best["wall_s"]})
            print(f"{tool:12s} {method:16s} {cache:5s} {best['wall_s']:7.1f} s {best['peak_anon_mib']:8.0f} MiB",
                  file=sys.stderr)
            if output.is_dir():
                shutil.rmtree(output)
            elif output.exists():
                output.unlink()

        for method in methods:
            if method not in METHODS:
                print(f"skipping {method}: not a streammerge method", file=sys.stderr)
                continue
            config = streammerge_config(method, models, tmp / "out.safetensors")
            inputs = [Path(m["path"]) for m in config["models"]] + ([Path(config["base"])] if "base" in config else [])
            (tmp / "sm.yaml").write_text(yaml.safe_dump(config))
            run("streammerge", method, "warm", [*streammerge, "merge", str(tmp / "sm.yaml"), "--quiet"], inputs,
                tmp / "out.safetensors")
            if args.cold and method == "linear":
                run("streammerge", method, "cold", [*streammerge, "merge", str(tmp / "sm.yaml"), "--quiet"], inputs,
                    tmp / "out.safetensors")
                floor = io_floor(inputs, models[0].stat().st_size, tmp)
                rows.append({"tool": "read+write floor", "method": "-", "cache": "cold", "wall_s": floor,
                             "peak_anon_mib": 0.0, "gb_per_s": sum(p.stat().st_size for p in inputs) / 1e9 / floor})
            if mergekit and METHODS[method].in_mergekit:
                (tmp / "mk.yaml").write_text(yaml.safe_dump(mergekit_config(method, models)))
                run("mergekit", method, "warm", [mergekit, str(tmp / "mk.yaml"), str(tmp / "mk-out"), "--quiet"],
                    inputs, tmp / "mk-out")
            if method == "linear" and not args.no_naive:
                run("naive", method, "warm", [sys.executable, str(ROOT / "scripts/naive_merge.py"),
                                              str(tmp / "naive.safetensors"),
                                              *(f"{p}:{w}" for p, w in zip(models, WEIGHTS))],
                    models, tmp / "naive.safetensors")
    lines = ["| tool | method | page cache | wall time (s) | peak anon RSS (MiB) | GB/s (input) |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tool']} | {r['method']} | {r['cache']} | {r['wall_s']:.1f} | "
                     f"{r['peak_anon_mib']:.0f} | {r['gb_per_s']:.2f} |")
    table = "\n".join(lines)
    print(table)
    (args.data / "results.md").write_text(table + "\n")
    (args.data / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    if not mergekit:
        print("\n(mergekit-pytorch not found: `make mergekit` installs it into .venv-mergekit)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
