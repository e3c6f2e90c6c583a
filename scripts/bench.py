#!/usr/bin/env python3
"""Benchmark: every merge method on one or more sets of checkpoints, by streammerge at two RAM budgets, beside
mergekit-pytorch when it is installed (and the naive all-in-RAM approach for linear). Sets (`--shapes`):
- `xtts`: three XTTS-v2-shaped checkpoints (1.87 GB each, random weights); methods with a base merge model1 and
  model2 onto model0;
- `llama`, `llama-bf16`: a Llama-shaped base and three fine-tunes of it (1.34 GB each in float32, half that in
  bfloat16); methods with a base merge the three fine-tunes onto it, the others merge the three fine-tunes;
- `many`: three models of 50,000 tiny tensors (64 float32 each, 17 MB a model), where per-tensor overhead sets
  the time; compared with the naive load + sum + save script like `xtts`.
One table per set: each method's wall time at each budget, their ratio, its peak anonymous RSS, mergekit's time
and the ratios to mergekit and to linear on the same set.

Wall time is that of the whole command; peak anonymous RSS is sampled every 5 ms from /proc (the process and
its children); GB/s is input bytes over wall time. "warm" runs read inputs from a warm page cache; "cold" runs
drop the page cache first (root only) and are compared with the time to read the inputs and durably write an
output of the same size. Every run starts with no dirty data pending (sync), so no tool pays for the previous
one's writeback.

    python scripts/bench.py [--data bench-data] [--shapes xtts,llama,llama-bf16|all] [--methods linear,ties,...|all]
                            [--budgets 4GiB,256MiB] [--cold] [--mergekit PATH | --no-mergekit] [--repeat N]
                            [--xtts-shrink N] [--llama-layers N] [--llama-shrink N] [--configs DIR]

`--configs DIR` writes the streammerge config of every row to DIR (SET-METHOD-BUDGET.yaml, its output beside it)
and runs nothing: the configs `scripts/time_merge.py` takes to time one row's merge in-process.
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
from concurrent.futures import ThreadPoolExecutor
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


def publish(data: Path, name: str, text: str, rows) -> None:
    """Print a benchmark's table and keep it, with its rows, as data/NAME.md and data/NAME.json."""
    print(text)
    (data / f"{name}.md").write_text(text + "\n")
    (data / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")


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


def io_floor(inputs: list[Path], out_bytes: int, out_dir: Path, overlapped: bool = False) -> float:
    """Seconds to read the inputs cold and write + fsync an output of `out_bytes`: one after the other, or
    with `overlapped` at the same time (the write on a second thread), as a merge that writes while it reads
    does at best."""
    drop_caches()
    start = time.perf_counter()

    def read() -> None:
        for p in inputs:
            with open(p, "rb", buffering=0) as f:
                while f.read(16 * MIB):
                    pass

    def write() -> None:
        block = b"\0" * (16 * MIB)
        with open(out_dir / "io-floor.bin", "wb", buffering=0) as f:
            written = 0
            while written < out_bytes:
                written += f.write(block[:min(len(block), out_bytes - written)])
            os.fsync(f.fileno())

    if overlapped:
        with ThreadPoolExecutor(1) as pool:
            writing = pool.submit(write)
            read()
            writing.result()  # (raises what the write raised)
    else:
        read()
        write()
    elapsed = time.perf_counter() - start
    (out_dir / "io-floor.bin").unlink()
    return elapsed


def streammerge_config(method: str, models: list[Path], output: Path, base: Path | None = None,
                       max_ram: str = "256MiB") -> dict:
    """The merge of `method` on a set: `models` without a `base` (XTTS) give their first as the base of the
    methods that need one; with a `base` (Llama) those methods merge all of `models` onto it."""
    from streammerge.methods.registry import get_method

    declared = get_method(method)
    extra = declared.typical
    if declared.needs_base:
        base, merged = (base, models) if base is not None else (models[0], models[1:])
        merged = merged[:declared.max_models] if declared.max_models else merged
    else:
        base = None
        merged = models[:2] if declared.max_models == 2 else models[:1] if declared.max_models == 1 else models
    weights = {1: [1.0], 2: [0.6, 0.4] if declared.max_models == 2 else [0.5, 0.5]}.get(len(merged), WEIGHTS)
    takes_weight = declared.param("weight") is not None
    config = {"output": str(output), "method": method, "max_ram": max_ram,
              "models": [{"path": str(p), **({"weight": w} if takes_weight else {}), **extra.get("model", {})}
                         for p, w in zip(merged, weights)]}
    if base is not None:
        config["base"] = str(base)
    if "parameters" in extra:
        config["parameters"] = extra["parameters"]
    return config


def mergekit_config(method: str, models: list[Path], base: Path | None = None, out_dtype: str = "float32") -> dict:
    """The same merge as a mergekit YAML (slerp-style methods name their first model as the base); mergekit
    computes in float32 and writes `out_dtype`, as streammerge does."""
    config = streammerge_config(method, models, Path("unused"), base)
    out = {"merge_method": method, "dtype": "float32", "out_dtype": out_dtype,
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


SHAPES = ("xtts", "llama", "llama-bf16", "many")
NAIVE_SHAPES = ("xtts", "many")  # sets the all-in-RAM script runs on (it merges the three models with WEIGHTS)


def bench_set(shape: str, root: Path, xtts_shrink: int = 1, llama_layers: int = synth.LLAMA["layers"],
              llama_shrink: int = 1) -> tuple[list[Path], Path | None, str]:
    """(models, base, output dtype) of a set, generated on first use (smaller sets in their own directories)."""
    if shape == "xtts":
        data = root / (shape if xtts_shrink == 1 else f"{shape}-shrink{xtts_shrink}")
        models = [data / f"model{i}.safetensors" for i in range(3)]
        if not all(p.exists() for p in models):
            print(f"generating three XTTS-v2-shaped checkpoints in {data} (5.6 GB / shrink^2, once)...",
                  file=sys.stderr)
            synth.write_models(data, 3, "safetensors", shrink=xtts_shrink)
        return models, None, "float32"
    if shape == "many":
        data = root / shape
        models = [data / f"model{i}.safetensors" for i in range(3)]
        if not all(p.exists() for p in models):
            print(f"generating three models of 50,000 tiny tensors in {data} (once)...", file=sys.stderr)
            synth.write_many_small(data, 3)
        return models, None, "float32"
    data = root / (shape + ("" if llama_layers == synth.LLAMA["layers"] else f"-{llama_layers}layers")
                   + ("" if llama_shrink == 1 else f"-shrink{llama_shrink}"))
    dtype = "bfloat16" if shape.endswith("bf16") else "float32"
    paths = [data / f"model{i}.safetensors" for i in range(4)]
    if not all(p.exists() for p in paths):
        print(f"generating a Llama-shaped base and three fine-tunes in {data} (once)...", file=sys.stderr)
        synth.write_llama(data, 4, getattr(__import__("torch"), dtype), llama_layers, llama_shrink)
    return paths[1:], paths[0], dtype


def find_mergekit(explicit: str | None) -> str | None:
    for candidate in (explicit, os.environ.get("MERGEKIT_PYTORCH"), str(ROOT / ".venv-mergekit/bin/mergekit-pytorch"),
                      shutil.which("mergekit-pytorch")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def write_configs(args, shapes: list[str], methods: list[str], budgets: list[str]) -> None:
    """Each row's streammerge config, as the bench runs it, in args.configs (the sets generated where missing)."""
    where = args.configs.resolve()  # (absolute paths: a config's relative paths are its own directory's)
    where.mkdir(parents=True, exist_ok=True)
    for shape in shapes:
        models, base, _ = bench_set(shape, args.data.resolve(), args.xtts_shrink, args.llama_layers,
                                    args.llama_shrink)
        for method in methods:
            for budget in budgets:
                name = f"{shape}-{method}-{budget}"
                config = streammerge_config(method, models, where / f"{name}.safetensors", base, budget)
                (where / f"{name}.yaml").write_text(yaml.safe_dump(config))
                print(where / f"{name}.yaml")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "bench-data")
    parser.add_argument("--shapes", default="xtts", help=f"comma-separated sets ({', '.join(SHAPES)}), or 'all'")
    parser.add_argument("--methods", default="linear", help="comma-separated methods, or 'all'")
    parser.add_argument("--budgets", default="4GiB,256MiB", help="streammerge's --max-ram for each row")
    parser.add_argument("--cold", action="store_true", help="also run linear with a cold page cache (root)")
    parser.add_argument("--no-naive", action="store_true", help="skip the all-in-RAM approach")
    parser.add_argument("--mergekit", help="path to mergekit-pytorch (default: .venv-mergekit, then PATH)")
    parser.add_argument("--no-mergekit", action="store_true", help="skip mergekit even where it is installed")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row; the fastest is reported")
    parser.add_argument("--configs", type=Path, metavar="DIR",
                        help="write each row's streammerge config to DIR and run nothing")
    parser.add_argument("--xtts-shrink", type=int, default=1,
                        help="divide the XTTS set's dimensions above 8 by this (1: real size, 1.87 GB a model)")
    parser.add_argument("--llama-layers", type=int, default=synth.LLAMA["layers"],
                        help="decoder layers of the Llama sets (16: 1.34 GB a model in float32)")
    parser.add_argument("--llama-shrink", type=int, default=1,
                        help="divide the Llama sets' vocabulary, hidden and intermediate sizes by this")
    args = parser.parse_args(argv)

    from streammerge.methods.registry import methods as registered

    METHODS = {m.name: m for m in registered()}
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    if "linear" in methods:  # first: the other methods are compared with it
        methods.remove("linear")
        methods.insert(0, "linear")
    shapes = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
    budgets = args.budgets.split(",")
    if args.configs:
        write_configs(args, shapes, [m for m in methods if m in METHODS], budgets)
        return 0
    mergekit = None if args.no_mergekit else find_mergekit(args.mergekit)
    streammerge = [sys.executable, "-m", "streammerge"]
    rows = []
    args.data.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.data, prefix="run-") as tmp:
        tmp = Path(tmp)

        def run(shape: str, tool: str, method: str, cache: str, command: list[str], inputs: list[Path],
                output: Path, budget: str = "-"):
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
                finally:
                    if output.is_dir():
                        shutil.rmtree(output)
                    elif output.exists():
                        output.unlink()
                best = result if best is None or result["wall_s"] < best["wall_s"] else best
            size = sum(p.stat().st_size for p in inputs)
            rows.append({"shape": shape, "tool": tool, "method": method, "budget": budget, "cache": cache, **best,
                         "gb_per_s": size / 1e9 / best["wall_s"]})
            print(f"{shape:10s} {tool:12s} {method:16s} {budget:7s} {cache:5s} {best['wall_s']:7.1f} s "
                  f"{best['peak_anon_mib']:8.0f} MiB", file=sys.stderr)

        for shape in shapes:
            models, base, out_dtype = bench_set(shape, args.data, args.xtts_shrink, args.llama_layers,
                                                 args.llama_shrink)
            for method in methods:
                if method not in METHODS:
                    print(f"skipping {method}: not a streammerge method", file=sys.stderr)
                    continue
                out = tmp / "out.safetensors"
                for budget in budgets:
                    config = streammerge_config(method, models, out, base, budget)
                    inputs = [Path(m["path"]) for m in config["models"]] + (
                        [Path(config["base"])] if "base" in config else [])
                    (tmp / "sm.yaml").write_text(yaml.safe_dump(config))
                    command = [*streammerge, "merge", str(tmp / "sm.yaml"), "--quiet"]
                    run(shape, "streammerge", method, "warm", command, inputs, out, budget)
                    if args.cold and method == "linear" and budget == budgets[-1]:
                        run(shape, "streammerge", method, "cold", command, inputs, out, budget)
                        floor = io_floor(inputs, inputs[0].stat().st_size, tmp)
                        rows.append({"shape": shape, "tool": "read+write floor", "method": "-", "budget": "-",
                                     "cache": "cold", "wall_s": floor, "peak_anon_mib": 0.0,
                                     "gb_per_s": sum(p.stat().st_size for p in inputs) / 1e9 / floor})
                if mergekit and METHODS[method].in_mergekit:
                    (tmp / "mk.yaml").write_text(yaml.safe_dump(mergekit_config(method, models, base, out_dtype)))
                    run(shape, "mergekit", method, "warm", [mergekit, str(tmp / "mk.yaml"), str(tmp / "mk-out"),
                                                            "--quiet"], inputs, tmp / "mk-out")
                if method == "linear" and not args.no_naive and shape in NAIVE_SHAPES:
                    run(shape, "naive", method, "warm", [sys.executable, str(ROOT / "scripts/naive_merge.py"),
                                                         str(tmp / "naive.safetensors"),
                                                         *(f"{p}:{w}" for p, w in zip(models, WEIGHTS))],
                        models, tmp / "naive.safetensors")
    text = tables(rows, budgets)
    publish(args.data, "results", text, rows)
    if not mergekit:
        print("\n(mergekit-pytorch not found: `make mergekit` installs it into .venv-mergekit)", file=sys.stderr)
    return 0


def tables(rows: list[dict], budgets: list[str]) -> str:
    """One markdown table per set: a row per method, streammerge at each budget beside mergekit."""
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        find = (lambda tool, method, budget="-", cache="warm": next(
            (r for r in mine if (r["tool"], r["method"], r["budget"], r["cache"]) == (tool, method, budget, cache)),
            None))
        linear = find("streammerge", "linear", budgets[0])
        head = (["method"] + [f"streammerge {b} (s)" for b in budgets] + ["peak anon RSS (MiB)"]
                + ([f"{budgets[-1]} / {budgets[0]}"] if len(budgets) > 1 else [])
                + ["mergekit (s)", f"streammerge {budgets[0]} / mergekit", f"/ linear {budgets[0]}"])
        lines = [f"**{shape}**", "", "| " + " | ".join(head) + " |",
                 "|---|" + "---:|" * (len(head) - 1)]
        for method in dict.fromkeys(r["method"] for r in mine if r["tool"] == "streammerge"):
            runs = [find("streammerge", method, b) for b in budgets]
            mk = find("mergekit", method)
            first = runs[0]
            cells = [f"`{method}`"] + [f"{r['wall_s']:.1f}" if r else "-" for r in runs]
            cells.append(" / ".join(f"{r['peak_anon_mib']:.0f}" for r in runs if r))
            if len(budgets) > 1:
                cells.append(f"{runs[-1]['wall_s'] / first['wall_s']:.2f}" if first and runs[-1] else "-")
            cells.append(f"{mk['wall_s']:.1f}" if mk else "-")
            cells.append(f"{first['wall_s'] / mk['wall_s']:.2f}" if first and mk else "-")
            cells.append(f"{first['wall_s'] / linear['wall_s']:.2f}" if first and linear else "-")
            lines.append("| " + " | ".join(cells) + " |")
        others = [r for r in mine if r["tool"] not in ("streammerge", "mergekit") or r["cache"] == "cold"]
        for r in others:
            lines.append(f"| {r['tool']} {r['method']} ({r['cache']}) | {r['wall_s']:.1f} s, "
                         f"{r['peak_anon_mib']:.0f} MiB, {r['gb_per_s']:.2f} GB/s |" + " |" * (len(head) - 2))
        out.append("\n".join(lines))
    return "\n\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
