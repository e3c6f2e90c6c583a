"""Command line: `streammerge merge|convert|inspect|diff` (also `python -m streammerge`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streammerge import __version__
from streammerge.convert import add_convert_parser
from streammerge.diff import add_diff_parser
from streammerge.errors import ConfigError, StreamMergeError
from streammerge.extract_lora import add_extract_lora_parser
from streammerge.inspect import add_inspect_parser
from streammerge.interrupts import Terminated, exit_status, install_handlers
from streammerge.methods.registry import methods
from streammerge.units import size_argument


def _methods_epilog() -> str:
    lines = ["merge methods (config `method:`):"]
    for method in methods():
        params = ", ".join(f"{p.name}={p.default}{' (per model)' if p.per_model else ''}" for p in method.params)
        lines.append(f"  {method.name:18s} {method.help}" + (f"; {params}" if params else ""))
    return "\n".join(lines)


def add_merge_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "merge", help="merge checkpoints as a YAML/JSON config describes",
        description="Merge checkpoints chunk by chunk under a RAM budget, as CONFIG describes.",
        epilog=_methods_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="merge config (YAML, or JSON)")
    p.add_argument("output_path", type=Path, nargs="?", metavar="OUTPUT",
                   help="output path, as mergekit-yaml takes it (same as --output)")
    p.add_argument("--output", "-o", type=Path, help="output path (overrides the config's `output`): "
                   "a .safetensors file, a .pth/.pt checkpoint, or a directory for sharded safetensors")
    p.add_argument("--max-ram", type=size_argument, metavar="SIZE",
                   help="peak anonymous RAM budget, e.g. 512MiB or 2GB (overrides `max_ram`; default 1GiB, "
                   "capped so that half of the free memory is left to others)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (tensors per rule, output size, shards, "
                   "estimated peak RAM) without merging")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    p.add_argument("--report", type=Path, metavar="FILE.json", help="write the run summary as JSON")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="write the result even if a merged tensor holds NaN/Inf (listed in the summary)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted merge into a directory output: shards it completed are verified "
                   "and kept (without --resume, its leftovers are removed and the merge starts over)")
    add_scale_arguments(p)
    p.set_defaults(handler=run_merge)


def _workers(text: str) -> int | str:
    from streammerge.config import parse_workers

    try:
        return parse_workers(text, "--workers")
    except StreamMergeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_scale_arguments(p) -> None:
    """--workers / --ray, shared by `merge` and `sweep`."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=_workers, metavar="N|auto",
                       help="merge on N local worker processes (auto: one per usable core), splitting max_ram "
                       "between them (overrides `workers`; default 1: this process alone)")
    where.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                       help="run the tasks on a Ray cluster: auto, HOST:PORT or ray://HOST:PORT (without ADDRESS: "
                       "RAY_ADDRESS, or a local instance); max_ram is then each task's budget. Every node must see "
                       "the inputs and the output directory at the same paths. Needs pip install 'streammerge[ray]'")


def scale_choice(args, config) -> tuple[int | str | None, dict | None]:
    """(workers, ray) from the command line, else None, None (the config decides)."""
    if args.ray is not None:
        return None, {**(config.ray or {}), "address": args.ray or (config.ray or {}).get("address")}
    if args.workers is not None:
        return args.workers, None
    return None, None


def run_merge(args) -> int:
    from streammerge.config import load_config
    from streammerge.distributed.driver import run_prepared
    from streammerge.engine import describe_plan, prepare
    from streammerge.io.output_safety import check_output_is_not_an_input
    from streammerge.report_file import check_report_path, write_report

    if args.output_path is not None and args.output is not None and args.output_path != args.output:
        raise ConfigError(f"two outputs given: '{args.output_path}' and --output '{args.output}'; give one.")
    config = load_config(args.config)
    for warning in config.warnings:
        print(f"streammerge: warning: {warning}", file=sys.stderr)
    prepared = prepare(config, args.output or args.output_path, args.max_ram)
    for warning in prepared.hf.warnings if prepared.hf is not None else ():
        print(f"streammerge: warning: {warning}", file=sys.stderr)
    try:
        if args.dry_run:
            print(describe_plan(prepared))
            return 0
        if args.report:
            check_output_is_not_an_input([], args.report, prepared.inputs,
                                         also=(args.config,), what="report")
            check_report_path(args.report, prepared.output)
        workers, ray = scale_choice(args, config)
        report = run_prepared(prepared, quiet=args.quiet, allow_nonfinite=args.allow_nonfinite or None,
                              resume=args.resume, workers=workers, ray=ray)
    finally:
        prepared.close()
    if args.report:
        write_report(args.report, report.as_dict(), prepared.output)
    if not args.quiet:
        print(report.summary(), file=sys.stderr)
    return 0


def add_sweep_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="run many merges of one config with values varied (a grid or variants), and score them",
        description="Merge every variant of a base config into its own output under output_dir, score each with "
        "the evaluate command, write sweep.csv and sweep.json and print the variants sorted by score. A rerun "
        "skips the variants whose output is complete. See the README's \"Many cores, many machines\".")
    p.add_argument("sweep", type=Path, help="sweep file (YAML or JSON): base_config or config, output_dir, grid "
                   "and/or variants, evaluate, goal")
    p.add_argument("--dry-run", action="store_true", help="list the variants (and which are done) without merging")
    p.add_argument("--max-ram", type=size_argument, metavar="SIZE",
                   help="RAM budget of each merge (overrides `max_ram`)")
    p.add_argument("--quiet", "-q", action="store_true", help="no line per variant and no table")
    add_scale_arguments(p)
    p.set_defaults(handler=run_sweep)


def run_sweep(args) -> int:
    from streammerge.sweep import run_sweep_command

    return run_sweep_command(args)


PARSERS = [add_merge_parser, add_convert_parser, add_inspect_parser, add_diff_parser, add_extract_lora_parser,
           add_sweep_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streammerge", description="Merge, convert and inspect large checkpoints with little RAM.")
    parser.add_argument("--version", action="version", version=f"streammerge {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSERS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    install_handlers()  # SIGTERM / SIGHUP take the same clean abort path as Ctrl-C
    try:
        return args.handler(args)
    except StreamMergeError as exc:
        print(f"streammerge: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        what = f"by {exc.args[0]}" if isinstance(exc, Terminated) else "(Ctrl-C)"
        print(f"streammerge: interrupted {what}; the partial output was removed and the output path is as it was.",
              file=sys.stderr)
        return exit_status(exc)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"streammerge: error: {where}{exc.strerror or exc}. Nothing was written to the output path.",
              file=sys.stderr)
        return 1
