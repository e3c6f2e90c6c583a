"""Refuse outputs that would replace or sit on top of an input, however the two paths are spelled.

Paths are compared after resolving symlinks, and files by identity (st_dev, st_ino) so hard links and bind
mounts are caught too. Run before anything is created or removed at the output.
"""

from __future__ import annotations

import os
from pathlib import Path

from streammerge.errors import OutputError


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def input_paths(checkpoints) -> list[Path]:
    """Every file a checkpoint was read from: the path given (a file or an index) and each mapped file."""
    paths = []
    for c in checkpoints:
        paths.append(Path(c.path))
        paths.extend(Path(f.path) for f in c.files)
    return list(dict.fromkeys(paths))


def check_output_is_not_an_input(output_files, output: Path, inputs, also: tuple = (),
                                 what: str = "output") -> None:
    """`output_files` are the files the output will create or replace (for a directory output, all of them
    inside `output`); `inputs` are Checkpoints, `also` further input files (the config)."""
    output = Path(output)
    sources = input_paths(inputs) + [Path(p) for p in also if p is not None]
    by_real = {os.path.realpath(p): p for p in sources}
    by_identity = {ident: p for p in sources if (ident := _identity(p)) is not None}
    for target in [output, *map(Path, output_files)]:
        source = by_real.get(os.path.realpath(target)) or by_identity.get(_identity(target))
        if source is not None:
            same = "is" if os.path.realpath(target) == os.path.realpath(source) else "is the same file as"
            raise OutputError(f"{what} '{target}' {same} the input '{source}'; writing it would destroy the input. "
                              f"Choose another {what} path.")
    directory = output if any(Path(f).parent == output for f in output_files) else None
    if directory is None:
        return
    real_dir = os.path.realpath(directory)
    dir_identity = _identity(directory)
    for source in sources:
        real = os.path.realpath(source)
        inside = real.startswith(real_dir.rstrip(os.sep) + os.sep)
        if not inside and dir_identity is not None:  # the same directory reached another way (bind mount)
            inside = any(_identity(parent) == dir_identity for parent in Path(real).parents)
        if inside:
            raise OutputError(f"output directory '{directory}' holds the input '{source}'; writing there could "
                              "replace it. Choose an output directory that holds no inputs.")
