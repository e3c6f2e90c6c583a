"""Output kinds, and the one place that decides which kind an output path is: a .pth/.pt torch checkpoint, one
.safetensors file, or a directory of Hugging Face shards (a path without suffix, or an existing directory).

Every output is built under temporary names next to its destination and appears only on `commit()`;
`abort()` leaves the destination as it was found. A sharded output can also resume an interrupted run.
To add a kind: write its module (a layout function and an `Output` class, see `output_spec`) and add a line
to OUTPUT_KINDS.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import stat
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


def check_output_location(path: Path, kind: OutputKind) -> None:
    """Refuse an output path that cannot hold this kind of output, naming the part of the path at fault: the
    destination a device, pipe or socket (`/dev/null`), a directory where a file goes or a file where a directory
    goes; a part of the path that is a file, a symbolic link loop or a link to nothing. Run before anything is
    created at the output."""
    path = Path(path)
    where = "output"
    node = path
    while True:
        try:
            mode = os.stat(node).st_mode
        except NotADirectoryError:  # a file further up the path: found on the way up
            node = node.parent
            continue
        except FileNotFoundError:
            if os.path.islink(node):
                raise OutputError(f"{where} '{path}': '{node}' is a symbolic link to '{os.readlink(node)}', which "
                                  "does not exist; fix or remove the link, or choose another output path.") from None
            node = node.parent
            continue
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                while node.parent != node and _stat_errno(node.parent) == errno.ELOOP:  # the link at fault
                    node = node.parent
                raise OutputError(f"{where} '{path}': '{node}' is a symbolic link loop (it leads back to itself); "
                                  "fix or remove the link, or choose another output path.") from None
            raise OutputError(f"{where} '{path}': cannot use '{node}' ({exc.strerror}); choose another output "
                              "path.") from None
        break
    if node != path:
        if not stat.S_ISDIR(mode):
            raise OutputError(f"{where} '{path}': '{node}' is {_file_type(mode)}, not a directory, so nothing can "
                              "be created inside it; choose another output path.")
        return
    if stat.S_ISDIR(mode) and not kind.sharded:
        raise OutputError(f"{where} '{path}' is an existing directory; a {kind.name} is one file. Give a file path "
                          "(e.g. inside that directory), or a path without suffix for a directory of shards.")
    if stat.S_ISREG(mode) and kind.sharded:
        raise OutputError(f"output '{path}' is an existing file, not a directory; a path without a .safetensors or "
                          ".pth suffix is written as a directory of shards. Remove the file, or choose another "
                          "path (ending in .safetensors or .pth for one file).")
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise OutputError(f"{where} '{path}' is {_file_type(mode)}, not a file or directory the merged model can be "
                          "written to. Give a file or directory path (to try a merge without writing anything, use "
                          "--dry-run).")


def _stat_errno(path: Path) -> int:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno
    return 0


def _file_type(mode: int) -> str:
    kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a pipe"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"))
    return next((name for test, name in kinds if test(mode)), "not a file or directory")


def kind_named(name: str) -> OutputKind:
    return next(kind for kind in OUTPUT_KINDS if kind.name == name)


def output_spec(path: Path, entries: list[Entry], metadata: dict[str, str], aliases: dict[str, str] | None = None,
                shard_size: int = 0, container: TorchContainer = TorchContainer(),
                resume: ResumeInputs = ResumeInputs(), companions: dict[str, bytes] | None = None) -> OutputSpec:
    """The spec of an output at `path`: its kind, and the file and byte offset of every tensor. `companions`
    (name -> content) go beside the weights of a directory output; other kinds have no place for them."""
    kind = output_kind(path)
    check_output_location(path, kind)
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
