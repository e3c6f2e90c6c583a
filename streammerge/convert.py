"""`streammerge convert`: any checkpoint streammerge reads, to safetensors, under the RAM budget.

A conversion is a one-model merge whose every tensor is taken from that model unchanged (a plan of COPY
tasks), so it runs through the same engine as a merge: chunk by chunk, inputs released as they are read, tied
tensors read once and written under every name. Bytes are copied, never converted, so every tensor comes out
bit for bit. The container's other content (config, step, epoch, ...) goes into the safetensors
`__metadata__` as JSON strings, beside `format: pt`; training state (optimizer, scheduler, scaler) is left out.

Sources may be files or directory trees. A tree is mirrored under the output directory
(`SRC/a/b/x.pth` -> `OUT/a/b/x.safetensors`); outputs that are already complete are skipped, so a batch can be
rerun (from cron, say) and only converts what is new. One line per file reports what happened; a failure does
not stop the batch, but makes the exit status non-zero.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from streammerge.config import parse_config
from streammerge.engine import Engine, prepare
from streammerge.errors import ConfigError, NoWeightsError, StreamMergeError
from streammerge.io import Checkpoint, open_checkpoint
from streammerge.io.containers import is_training_state
from streammerge.io.sharded import read_weight_map
from streammerge.units import format_size, size_argument

# What a directory walk picks up (a single file named on the command line is taken whatever its name).
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
INDEX_SUFFIX = ".index.json"
# Outputs that would be read as something other than safetensors.
NOT_SAFETENSORS_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".json")


@dataclass(frozen=True)
class Job:
    source: Path  # a checkpoint file or shard index
    target: Path  # a .safetensors file, or a directory for sharded output
    found_by_walk: bool = False  # picked up from a directory tree rather than named by the user


# -- which files, and where they go --------------------------------------------------------------------------
def target_stem(source: Path) -> str:
    """`x.pth` -> `x`; `model.safetensors.index.json` -> `model`; Hugging Face's `pytorch_model*` -> `model*`."""
    name = source.name
    if name.endswith(INDEX_SUFFIX):
        name = name[:-len(INDEX_SUFFIX)]
    stem = Path(name).stem if Path(name).suffix in CHECKPOINT_SUFFIXES else name
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model"):]
    return stem


def _shards_of_index(index: Path) -> set[Path]:
    """The shard files an index stands for. Names that are indexes themselves are not shards (an index listing
    itself or another index stays listed, and fails with the reader's message); an unreadable index gives none."""
    return {index.parent / name for name in read_weight_map(index).values()
            if isinstance(name, str) and not name.endswith(".json")}


def find_checkpoints(root: Path, exclude: Path | None = None) -> list[Path]:
    """Checkpoint files under `root` (sorted; hidden entries and `exclude` skipped). A shard index stands for
    its shards, which are not listed on their own."""
    found: list[Path] = []
    shards: set[Path] = set()
    excluded = os.path.realpath(exclude) if exclude is not None else None
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.realpath(os.path.join(directory, d)) != excluded)
        for name in sorted(files):
            path = Path(directory) / name
            if name.startswith("."):
                continue
            if name.endswith(INDEX_SUFFIX):
                found.append(path)
                shards |= _shards_of_index(path)
            elif path.suffix in CHECKPOINT_SUFFIXES:
                found.append(path)
    return [p for p in found if p not in shards]


def _sharded_target(parent: Path, stem: str) -> Path:
    """Shards of Hugging Face's `model` go straight into the mirrored directory (its own layout); others get a
    directory of their own, named without dots (a dotted name would be taken for a file of that kind)."""
    return parent if stem == "model" else parent / stem.replace(".", "_")


def plan_jobs(sources: list[Path], output: Path, sharded: bool) -> list[Job]:
    """Where each source goes; refuses combinations that cannot mean anything."""
    if output.suffix in NOT_SAFETENSORS_SUFFIXES:
        raise ConfigError(f"--output {output}: convert writes safetensors; give a .safetensors file (one source) "
                          "or a directory. To write a .pth checkpoint, use `streammerge merge` with one model.")
    missing = [s for s in sources if not s.exists()]
    if missing:
        raise ConfigError(f"{missing[0]}: no such file or directory. Check the source paths.")
    single_file = len(sources) == 1 and sources[0].is_file()
    if output.suffix == ".safetensors":
        if not single_file:
            raise ConfigError(f"--output {output} is one file, but the sources are several files or a directory; "
                              "give an output directory to convert them all.")
        if sharded:
            raise ConfigError(f"--shard-size writes a directory of shards, but --output {output} is a file; "
                              "give a directory, or leave --shard-size out.")
        return [Job(sources[0], output)]
    if single_file and sharded:
        return [Job(sources[0], output)]
    jobs = []
    for source in sources:
        if source.is_file():
            files, base = [source], source.parent
        else:
            files, base = find_checkpoints(source, exclude=output), source
        for path in files:
            parent = output / path.parent.relative_to(base)
            stem = target_stem(path)
            jobs.append(Job(path, _sharded_target(parent, stem) if sharded else parent / f"{stem}.safetensors",
                            found_by_walk=not source.is_file()))
    return jobs


# -- one conversion ------------------------------------------------------------------------------------------
def converted_metadata(checkpoint: Checkpoint) -> dict[str, str]:
    """The safetensors `__metadata__`: the container's other content as JSON strings, and `format: pt`."""
    if checkpoint.format.startswith(("safetensors", "sharded")):
        meta = {k: str(v) for k, v in checkpoint.metadata.items() if k != "total_size"}  # already strings
    else:
        meta = {str(k): json.dumps(v, ensure_ascii=False) for k, v in checkpoint.metadata.items()
                if not is_training_state(k, v)}
    meta["format"] = "pt"  # transformers refuses anything else
    return meta


def tensor_signature(checkpoint: Checkpoint) -> dict:
    return {name: (tuple(info.shape), info.dtype) for name, info in checkpoint.tensors.items()}


def is_complete(target: Path, source: Checkpoint) -> bool:
    """A valid safetensors output (file or sharded directory) holding exactly the source's tensors."""
    if not target.exists():
        return False
    try:
        with open_checkpoint(target) as existing:
            return (existing.format in ("safetensors", "sharded-safetensors")
                    and tensor_signature(existing) == tensor_signature(source))
    except StreamMergeError:
        return False


def conversion_config(job: Job, shard_size: int | None):
    """A one-model merge that takes every tensor from that model unchanged."""
    data = {"output": str(job.target), "models": [{"path": str(job.source)}], "rules": [{"match": "*", "take": 0}]}
    if shard_size is not None:
        data["shard_size"] = shard_size
    return parse_config(data)


@dataclass
class Outcome:
    job: Job
    status: str  # converted | skipped | failed
    detail: str

    def line(self) -> str:
        if self.status == "converted":
            return f"converted {self.job.source} -> {self.job.target} ({self.detail})"
        detail = self.detail.removeprefix(f"{self.job.source}: ")  # messages often start with the path
        return f"{self.status} {self.job.source}: {detail}"


def convert_one(job: Job, shard_size: int | None = None, max_ram: int | None = None, force: bool = False,
                quiet: bool = False) -> Outcome:
    try:
        prepared = prepare(conversion_config(job, shard_size), job.target, max_ram)
        try:
            if not force and is_complete(job.target, prepared.checkpoints[0]):
                return Outcome(job, "skipped", f"{job.target} is already complete")
            started = time.perf_counter()
            report = Engine(prepared, quiet=quiet, allow_nonfinite=True,
                            metadata=converted_metadata(prepared.checkpoints[0])).run()
        finally:
            prepared.close()
    except NoWeightsError as exc:
        if job.found_by_walk:  # e.g. optimizer.pt or training_args.bin beside the weights in a training folder
            return Outcome(job, "skipped", f"holds no model weights ({str(exc).split(': ', 1)[-1].split('. ')[0]})")
        return Outcome(job, "failed", str(exc))
    except StreamMergeError as exc:
        return Outcome(job, "failed", str(exc))
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return Outcome(job, "failed", f"{where}{exc.strerror or exc}")
    except Exception as exc:  # a bad file must not stop the batch; report it and go on
        return Outcome(job, "failed", f"{type(exc).__name__}: {exc}")
    detail = (f"{report.tensors} tensors, {report.written_bytes / 1e9:.2f} GB, {time.perf_counter() - started:.1f} s, "
              f"peak anonymous RAM {format_size(report.peak_anon_bytes)}")
    if report.nonfinite_tensors:
        detail += f"; NaN/Inf kept as found in {len(report.nonfinite_tensors)} tensor(s)"
    return Outcome(job, "converted", detail)


def convert(sources: list[Path], output: Path, shard_size: int | None = None, max_ram: int | None = None,
            force: bool = False, quiet: bool = False, echo=print) -> list[Outcome]:
    jobs = plan_jobs([Path(s) for s in sources], Path(output), shard_size is not None)
    outcomes: list[Outcome] = []
    claimed: dict[str, Job] = {}
    seen_sources: set[str] = set()
    for job in jobs:
        real_source, real_target = os.path.realpath(job.source), os.path.realpath(job.target)
        if real_source in seen_sources:
            continue
        seen_sources.add(real_source)
        if real_target in claimed:
            outcome = Outcome(job, "failed", f"its output {job.target} is also the output of "
                              f"{claimed[real_target].source}; convert one of them on its own, to another output")
        else:
            claimed[real_target] = job
            outcome = convert_one(job, shard_size, max_ram, force, quiet)
        outcomes.append(outcome)
        echo(outcome.line())
    return outcomes


# -- command line --------------------------------------------------------------------------------------------
def add_convert_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert checkpoints (.pth, .bin, .ckpt, shards) to safetensors",
        description="Convert checkpoints to safetensors chunk by chunk under a RAM budget, bit for bit. "
        "Directory sources are walked (files ending in " + ", ".join(CHECKPOINT_SUFFIXES) + " or "
        f"{INDEX_SUFFIX}) and mirrored under the output directory; outputs already complete are skipped.")
    p.add_argument("sources", nargs="+", type=Path, metavar="SRC", help="checkpoint file or directory tree")
    p.add_argument("--output", "-o", type=Path, required=True, metavar="DIR_OR_FILE",
                   help="a .safetensors file (one source file), or a directory")
    p.add_argument("--shard-size", type=size_argument, metavar="SIZE",
                   help="write Hugging Face shards of at most SIZE (e.g. 5GB) into a directory per checkpoint "
                   "(--output itself for one source file)")
    p.add_argument("--max-ram", type=size_argument, metavar="SIZE",
                   help="peak anonymous RAM budget, e.g. 256MiB (default 1GiB, capped at half the available memory)")
    p.add_argument("--force", action="store_true", help="convert even where the output is already complete")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars (the per-file lines remain)")
    p.set_defaults(handler=run_convert)


def run_convert(args) -> int:
    outcomes = convert(args.sources, args.output, args.shard_size, args.max_ram, args.force, args.quiet,
                       echo=lambda line: print(line, flush=True))
    counts = {status: sum(o.status == status for o in outcomes) for status in ("converted", "skipped", "failed")}
    print(", ".join(f"{n} {status}" for status, n in counts.items()), file=sys.stderr)
    return 1 if counts["failed"] else 0
