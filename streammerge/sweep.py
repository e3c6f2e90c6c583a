"""`streammerge sweep SWEEP.yaml`: many merges of one base config with some values varied (a grid and/or a list
of variants), each into its own output, optionally scored by an evaluate command; results in sweep.csv and
sweep.json. A rerun skips the variants whose output is complete (a rerun resumes the sweep).

    base_config: merge.yaml          # or the config inline, under `config:`
    output_dir: sweeps/weights
    grid:                            # the product of these lists (dotted paths into the config)
      models.1.weight: [0.2, 0.5, 0.8]
      method: [ties, dare_ties]
    variants:                        # and/or explicit variants
      - {method: linear, models.1.weight: 0.5}
    evaluate: "python score.py {output}"   # last line of its stdout: a number (the score)
    goal: max                        # max (default) or min: how the table is sorted
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import itertools
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from streammerge.config import MergeConfig, native_config_data, parse_config
from streammerge.config_file import read_config_file
from streammerge.errors import ConfigError, StreamMergeError, short
from streammerge.io.files import write_atomically

SWEEP_KEYS = {"base_config", "config", "output_dir", "grid", "variants", "evaluate", "goal"}
RESULT_FIELDS = ["variant", "name", "values", "status", "seconds", "peak_ram_bytes", "output", "score", "error"]
EVALUATE_TAIL = 400  # characters of a failed evaluate command's output kept in the results


@dataclass
class Variant:
    index: int
    values: dict  # dotted path -> value
    config: MergeConfig
    output: Path
    digest: str  # of the variant's whole config: a finished output is reused only for the same config

    @property
    def name(self) -> str:
        return self.output.name


@dataclass
class Result:
    variant: int
    name: str
    values: dict
    status: str  # merged, reused, failed
    seconds: float | None = None
    peak_ram_bytes: int | None = None
    output: str = ""
    score: float | None = None
    error: str = ""
    digest: str = field(default="", repr=False)


@dataclass
class Sweep:
    source: Path
    output_dir: Path
    variants: list[Variant]
    evaluate: str | None
    goal: str


# -- reading the sweep file --------------------------------------------------------------------------------

def set_path(data: dict, path: str, value) -> None:
    """Set `models.1.weight` (dict keys and list indices, dotted) in a config mapping."""
    parts = path.split(".")
    node = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"sweep path '{path}': '{part}' is not an index of a list of {len(node)}.")
            if isinstance(node[int(part)], str) and not last:  # `models: [a.pth]` shorthand
                node[int(part)] = {"path": node[int(part)]}
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"sweep path '{path}': '{'.'.join(parts[:depth])}' is a value, not a mapping or list.")


def _slug(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_")[:40] or "_"


def variant_name(index: int, values: dict) -> str:
    short = {path.split(".")[-1] if not path.split(".")[-1].isdigit() else path: v for path, v in values.items()}
    return "-".join([f"{index:03d}"] + [f"{_slug(k)}={_slug(v)}" for k, v in short.items()])


def _value_sets(data: dict, where: str) -> list[dict]:
    grid = data.get("grid") or {}
    variants = data.get("variants") or []
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{where}: 'grid' must map dotted config paths to non-empty lists of values, e.g. "
                          "{models.1.weight: [0.2, 0.5], method: [ties, dare_ties]}.")
    if not isinstance(variants, list) or not all(isinstance(v, dict) and v for v in variants):
        raise ConfigError(f"{where}: 'variants' must be a list of mappings of dotted config paths to values.")
    sets = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else []
    sets += [dict(v) for v in variants]
    if not sets:
        raise ConfigError(f"{where}: nothing to sweep: give a 'grid' and/or 'variants'.")
    return sets


def load_sweep(path: Path) -> Sweep:
    path = Path(path)
    data = read_config_file(path)
    where = str(path)
    unknown = sorted(set(data) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'. Allowed here: {', '.join(sorted(SWEEP_KEYS))}.")
    if ("base_config" in data) == ("config" in data):
        raise ConfigError(f"{where}: give the merge config either as 'base_config: PATH' or inline under 'config:'.")
    if "base_config" in data:
        base_path = Path(str(data["base_config"]))
        base = read_config_file(base_path)
    else:
        base_path, base = path, data["config"]
        if not isinstance(base, dict):
            raise ConfigError(f"{where}: 'config' must be a merge config (a mapping).")
    base = native_config_data(base, base_path, [])
    if "output_dir" not in data:
        raise ConfigError(f"{where}: 'output_dir' is missing: the directory that gets one output per variant.")
    output_dir = Path(str(data["output_dir"]))
    evaluate = data.get("evaluate")
    if evaluate is not None and (not isinstance(evaluate, str) or "{output}" not in evaluate):
        raise ConfigError(f"{where}: 'evaluate' must be a command with {{output}} where the merged output's path "
                          "goes, e.g. \"python score.py {output}\".")
    goal = data.get("goal", "max")
    if goal not in ("max", "min"):
        raise ConfigError(f"{where}: goal must be max or min (is a higher score better, or a lower one).")
    suffix = Path(str(base.get("output") or "merged.safetensors")).suffix
    variants = []
    for index, values in enumerate(_value_sets(data, where)):
        variant_data = copy.deepcopy(base)
        for key, value in values.items():
            set_path(variant_data, str(key), value)
        output = output_dir / (variant_name(index, values) + suffix)
        variant_data["output"] = str(output)
        try:
            config = parse_config(variant_data, base_path)
        except ConfigError as exc:
            raise ConfigError(f"{where}: variant {index} ({short(values, 200)}) is not a valid merge config: {exc}") from None
        digest = hashlib.sha256(json.dumps(variant_data, sort_keys=True, default=str).encode()).hexdigest()[:16]
        variants.append(Variant(index, values, config, output, digest))
    return Sweep(path, output_dir, variants, evaluate, goal)


# -- running it --------------------------------------------------------------------------------------------

def is_complete(output: Path) -> bool:
    """A committed output: outputs appear at their path only when whole (a directory once its index is there)."""
    if output.is_dir():  # the index is written last; a single shard appears at commit, without an index
        return (output / "model.safetensors.index.json").is_file() or (output / "model.safetensors").is_file()
    return output.is_file()


def previous_results(output_dir: Path) -> dict[str, dict]:
    try:
        rows = json.loads((output_dir / "sweep.json").read_text(encoding="utf-8"))["results"]
        return {row["name"]: row for row in rows if isinstance(row, dict) and "name" in row}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def evaluate_output(command: str, output: Path) -> tuple[float | None, str]:
    """(score, error): the number on the last line of the command's stdout, or why there is none."""
    line = command.replace("{output}", shlex.quote(str(output)))
    try:
        done = subprocess.run(line, shell=True, capture_output=True, text=True)
    except OSError as exc:
        return None, f"evaluate could not run: {exc}"
    lines = [x for x in done.stdout.splitlines() if x.strip()]
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip())[-EVALUATE_TAIL:]
        return None, f"evaluate exited with status {done.returncode}: {tail}"
    try:
        return float(lines[-1].strip()), ""
    except (IndexError, ValueError):
        return None, f"evaluate printed no number on its last line ({(lines or [''])[-1][-80:]!r})"


def run_sweep(sweep: Sweep, workers=None, ray=None, max_ram: int | None = None, quiet: bool = False,
              log=print) -> list[Result]:
    from streammerge.distributed.driver import make_executor

    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    previous = previous_results(sweep.output_dir)
    results: list[Result] = []
    executor = make_executor(workers or 1, ray) if (workers or ray) else None
    try:
        for variant in sweep.variants:
            old = previous.get(variant.name, {})
            if is_complete(variant.output) and old.get("digest") == variant.digest and old.get("status") != "failed":
                result = Result(variant.index, variant.name, variant.values, "reused", old.get("seconds"),
                                old.get("peak_ram_bytes"), str(variant.output), old.get("score"), old.get("error", ""),
                                variant.digest)
                if sweep.evaluate and result.score is None:
                    result.score, result.error = evaluate_output(sweep.evaluate, variant.output)
            else:
                result = _merge_variant(variant, executor, max_ram)
                if sweep.evaluate and result.status == "merged":
                    result.score, result.error = evaluate_output(sweep.evaluate, variant.output)
            results.append(result)
            write_results(sweep, results)
            if not quiet:
                log(_progress_line(result, len(sweep.variants)))
    finally:
        if executor is not None:
            executor.close()
    return results


def _merge_variant(variant: Variant, executor, max_ram) -> Result:
    from streammerge.distributed.driver import run_distributed, run_prepared
    from streammerge.engine import prepare

    started = time.perf_counter()
    result = Result(variant.index, variant.name, variant.values, "merged", output=str(variant.output),
                    digest=variant.digest)
    try:
        prepared = prepare(variant.config, None, max_ram)
        try:
            report = (run_distributed(prepared, executor, quiet=True) if executor is not None
                      else run_prepared(prepared, quiet=True))
        finally:
            prepared.close()
        result.peak_ram_bytes = max(report.peak_anon_bytes, report.task_peak_anon_bytes)
    except StreamMergeError as exc:
        result.status, result.error = "failed", str(exc)
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def _progress_line(result: Result, total: int) -> str:
    what = {"reused": "already complete", "merged": f"merged in {result.seconds:.1f} s", "failed": "FAILED"}
    score = f", score {result.score:g}" if result.score is not None else ""
    error = f": {result.error}" if result.error else ""
    return f"[{result.variant + 1}/{total}] {result.name}: {what[result.status]}{score}{error}"


def sorted_results(results: list[Result], goal: str) -> list[Result]:
    scored = [r for r in results if r.score is not None]
    scored.sort(key=lambda r: (-r.score if goal == "max" else r.score, r.variant))
    return scored + [r for r in results if r.score is None]


def write_results(sweep: Sweep, results: list[Result]) -> None:
    rows = [asdict(r) for r in results]
    done = {r.name for r in results}
    for old in previous_results(sweep.output_dir).values():  # keep records of variants not rerun this time
        if old["name"] not in done and any(v.name == old["name"] for v in sweep.variants):
            rows.append(old)
    rows.sort(key=lambda r: r["variant"])
    text = json.dumps({"sweep": str(sweep.source), "goal": sweep.goal, "results": rows}, indent=1) + "\n"
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, RESULT_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "values": json.dumps(row["values"], sort_keys=True)})
    # Atomically: an interrupted sweep leaves the previous complete records, which a rerun resumes from.
    write_atomically(sweep.output_dir / "sweep.json", text)
    write_atomically(sweep.output_dir / "sweep.csv", table.getvalue())


def format_table(results: list[Result], goal: str) -> str:
    lines = [f"{'score':>12}  {'seconds':>8}  {'peak MiB':>8}  variant"]
    for r in sorted_results(results, goal):
        score = f"{r.score:12.6g}" if r.score is not None else f"{'-':>12}"
        seconds = f"{r.seconds:8.1f}" if r.seconds is not None else f"{'-':>8}"
        peak = f"{r.peak_ram_bytes / 2**20:8.0f}" if r.peak_ram_bytes else f"{'-':>8}"
        lines.append(f"{score}  {seconds}  {peak}  {r.name}" + (f"  ({r.error})" if r.error else ""))
    return "\n".join(lines)


def describe(sweep: Sweep) -> str:
    previous = previous_results(sweep.output_dir)
    lines = [f"{len(sweep.variants)} variant(s) of {sweep.source} into {sweep.output_dir}:"]
    for v in sweep.variants:
        done = is_complete(v.output) and previous.get(v.name, {}).get("digest") == v.digest
        lines.append(f"  {v.index:3d}  {'done   ' if done else 'pending'}  {v.output}  "
                     f"{json.dumps(v.values, sort_keys=False)}  ({v.config.method.name})")
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------------------------

def run_sweep_command(args) -> int:
    sweep = load_sweep(args.sweep)
    if args.dry_run:
        print(describe(sweep))
        return 0
    ray = {"address": args.ray or None, "max_retries": 3} if args.ray is not None else None
    results = run_sweep(sweep, workers=args.workers, ray=ray, max_ram=args.max_ram, quiet=args.quiet,
                        log=lambda line: print(line, file=sys.stderr))
    if not args.quiet:
        print(format_table(results, sweep.goal))
        print(f"results: {sweep.output_dir / 'sweep.csv'}, {sweep.output_dir / 'sweep.json'}", file=sys.stderr)
    failed = [r for r in results if r.status == "failed"]
    return 1 if failed and len(failed) == len(results) else 0
