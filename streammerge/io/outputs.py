"""Output kinds, and the one place that decides which kind an output path is: a .pth/.pt torch checkpoint, one
.safetensors file, or a directory of Hugging Face shards (a path without suffix, or an existing directory).

Every output is built under temporary names next to its destination and appears only on `commit()`;
`abort()` leaves the destination as it was found. A sharded output can also resume an interrupted run.
To add a kind: write its module (a layout function and an `Output` class, see `output_spec`) and add a line
to OUTPUT_KINDS.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from streammerge.errors import OutputError
from streammerge.io.output_spec import Entry, Output, OutputSpec, ResumeInputs, TorchContainer
from streammerge.io.pth_output import TorchCheckpointOutput, torch_checkpoint_layout
from streammerge.io.sharded_output import ShardedOutput, sharded_layout
from streammerge.io.single_file_output import SafetensorsFileOutput, safetensors_file_layout
from streammerge.units import format_size


@dataclass(frozen=True)
class OutputKind:
    name: str
    accepts: Callable[[Path], bool]
    layout: Callable[[OutputSpec], tuple]  # spec -> (files, placements)
    factory: Callable[..., Output]  # (spec, resume=bool) -> Output
    sharded: bool = False


# First match wins.
OUTPUT_KINDS: list[OutputKind] = [
    OutputKind("torch checkpoint (.pth)", lambda p: p.suffix in (".pth", ".pt"), torch_checkpoint_layout,
               TorchCheckpointOutput),
    OutputKind("safetensors file", lambda p: p.suffix == ".safetensors", safetensors_file_layout,
               SafetensorsFileOutput),
    OutputKind("sharded safetensors directory", lambda p: p.suffix == "" or p.is_dir(), sharded_layout,
               ShardedOutput, sharded=True),
]


def output_kind(path: Path) -> OutputKind:
    for kind in OUTPUT_KINDS:
        if kind.accepts(Path(path)):
            return kind
    raise OutputError(f"output '{path}': unknown kind; use a .safetensors file, a .pth/.pt file or a directory "
                      "(sharded safetensors).")


def kind_named(name: str) -> OutputKind:
    return next(kind for kind in OUTPUT_KINDS if kind.name == name)


def output_spec(path: Path, entries: list[Entry], metadata: dict[str, str], aliases: dict[str, str] | None = None,
                shard_size: int = 0, container: TorchContainer = TorchContainer(),
                resume: ResumeInputs = ResumeInputs(), companions: dict[str, bytes] | None = None) -> OutputSpec:
    """The spec of an output at `path`: its kind, and the file and byte offset of every tensor. `companions`
    (name -> content) go beside the weights of a directory output; other kinds have no place for them."""
    kind = output_kind(path)
    spec = OutputSpec(kind.name, Path(path), tuple(entries), dict(metadata), dict(aliases or {}), (), {},
                      shard_size, container, resume, dict(companions or {}) if kind.sharded else {})
    files, placements = kind.layout(spec)
    return dataclasses.replace(spec, files=files, placements=placements)


def make_output(spec: OutputSpec, resume: bool = False) -> Output:
    return kind_named(spec.kind).factory(spec, resume=resume)


def check_disk_space(path: Path, needed: int) -> None:
    directory = Path(path)
    while not directory.exists():
        directory = directory.parent
    if directory.is_file():
        directory = directory.parent
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise OutputError(f"output '{path}' needs {format_size(needed)} but only {format_size(free)} is free on "
                          f"{directory}; free some space or choose another output location. Nothing was written.")
