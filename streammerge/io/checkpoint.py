"""A checkpoint opened for streaming, and the registry of formats that open one.

Formats are recognised from the file's first bytes, not its name (`x.bin` may be a zip or a legacy torch
file); the one exception is a shard index, which must also be named `*.json`, since any JSON object starts
with `{`. A directory is resolved to the checkpoint file or index inside it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from streammerge.errors import CheckpointError, StreamMergeError, short
from streammerge.io.mapped import MappedFile, TensorInfo


@dataclass
class Checkpoint:
    path: Path
    format: str
    tensors: dict[str, TensorInfo]  # in the order the bytes lie in the files
    metadata: dict = field(default_factory=dict)  # JSON-able non-tensor content
    container: str = ""  # where the weights sit inside the file ("" = top level)
    files: list[MappedFile] = field(default_factory=list)

    def __post_init__(self):
        for name in self.tensors:
            if not isinstance(name, str) or not is_valid_text(name):
                self.close()
                raise CheckpointError(f"{self.path}: tensor name {short(name)} is not valid Unicode text (it holds "
                                      "a lone surrogate or is not a string), so no output format can store it; "
                                      "the file is corrupt or was written by a broken tool.")

    @property
    def total_bytes(self) -> int:
        """Tensor data bytes, shared storage counted once."""
        seen = {}
        for info in self.tensors.values():
            seen.setdefault(info.storage_key, info.nbytes)
        return sum(seen.values())

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def is_valid_text(text: str) -> bool:
    """Whether `text` can be written as UTF-8 (JSON and pickles can carry lone surrogates, which cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def clean_text(text: str) -> str:
    """`text` with any lone surrogate written as its escape, so that it can be stored as UTF-8."""
    return text if is_valid_text(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class Format:
    name: str
    sniff: Callable[[bytes, Path], bool]  # (first 64 bytes, path) -> is this format
    open: Callable[..., Checkpoint]  # (path, **options) -> Checkpoint


FORMATS: list[Format] = []


def register_format(name: str, sniff, opener) -> Format:
    FORMATS.append(Format(name, sniff, opener))
    return FORMATS[-1]


# Files looked for inside a directory, best first.
DIRECTORY_CANDIDATES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "model.pth",
    "model.pt",
)


def resolve_path(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory. Check the path in your config.")
    if not path.is_dir():
        return path
    for name in DIRECTORY_CANDIDATES:
        if (path / name).is_file():
            return path / name
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return singles[0]
    raise CheckpointError(
        f"{path}: directory holds no checkpoint streammerge recognises (looked for "
        f"{', '.join(DIRECTORY_CANDIDATES)} or a single *.safetensors file). Point `path` at the file itself.")


def sniff_format(path: Path) -> tuple[Format | None, bytes]:
    """The format of a regular file, from its first bytes (None when none matches), and those bytes.

    Only regular files are opened: a FIFO would block the open or the read forever, a device such as
    /dev/zero would never end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open for reading ({exc.strerror}).") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{path}: is not a regular file (a pipe, a device or a socket); streammerge reads "
                                  "checkpoints from regular files only. Give the path of the checkpoint file.")
        head = os.pread(fd, 64, 0)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror}).") from exc
    finally:
        os.close(fd)
    return next((fmt for fmt in FORMATS if fmt.sniff(head, path)), None), head


def open_checkpoint(path, **options) -> Checkpoint:
    """Open any supported checkpoint (file or directory) for streaming; no tensor data is read."""
    path = resolve_path(Path(path))
    fmt, head = sniff_format(path)
    if fmt is not None:
        return _open_as(fmt, path, options)
    raise CheckpointError(
        f"{path}: not a checkpoint format streammerge reads (safetensors, a sharded index, or a zip-format or "
        f"legacy torch file); its first bytes are {head[:8]!r}. Re-save it with torch.save or safetensors.")


def _open_as(fmt: Format, path: Path, options: dict) -> Checkpoint:
    """Readers refuse what they know to be wrong with a CheckpointError; anything else a malformed file
    provokes (deep in torch or the pickle machinery) is reported the same way, naming the file."""
    try:
        return fmt.open(path, **options)
    except StreamMergeError:
        raise
    except MemoryError:
        raise CheckpointError(f"{path}: reading its {fmt.name} structure needs more memory than is available; "
                              "the file is corrupt or not a checkpoint.") from None
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}".strip()
        detail = detail if len(detail) <= 200 else detail[:197] + "..."
        raise CheckpointError(f"{path}: cannot be read as {fmt.name} ({detail}). The file is truncated, corrupt "
                              "or written by an unusual tool; re-download or re-save it.") from exc
