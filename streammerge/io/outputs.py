"""Output kinds, chosen from the output path: one safetensors file, or a directory of Hugging Face shards.

Every output is built under temporary names next to its destination and appears only on `commit()`;
`abort()` leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from streammerge.errors import OutputError
from streammerge.io.safetensors_io import SafetensorsWriter, fsync_directory

Entry = tuple[str, torch.dtype, tuple]  # (name, dtype, shape)


class SafetensorsFileOutput:
    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str], **_options):
        self.path = Path(path)
        self.writer = SafetensorsWriter(self.path, entries, metadata)

    @property
    def files(self) -> list[Path]:
        return [self.path]

    @property
    def total_size(self) -> int:
        return self.writer.total_size

    def open(self) -> None:
        self.created_dirs = make_directories(self.path.parent)
        self.writer.open()

    def write(self, name: str, element_offset: int, chunk: torch.Tensor) -> None:
        self.writer.write(name, element_offset, chunk)

    def copy(self, source: str, target: str, chunk_bytes: int) -> None:
        self.writer.copy_tensor(source, target, chunk_bytes)

    def commit(self) -> None:
        self.writer.commit()

    def abort(self) -> None:
        self.writer.abort()
        remove_directories(getattr(self, "created_dirs", []))


def make_directories(path: Path) -> list[Path]:
    """Create `path` and missing parents; return those created (innermost first) so an abort can remove them."""
    created = []
    while not path.exists():
        created.append(path)
        path = path.parent
    for directory in reversed(created):
        directory.mkdir()
    return created


def remove_directories(created: list[Path]) -> None:
    for directory in created:
        shutil.rmtree(directory, ignore_errors=True)


def assign_shards(entries: list[Entry], shard_size: int) -> list[list[Entry]]:
    """Greedy split in processing order; a tensor larger than shard_size gets a shard of its own."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        nbytes = entry[1].itemsize * _numel(entry[2])
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class ShardedOutput:
    """`model-0000i-of-0000N.safetensors` shards plus `model.safetensors.index.json`."""

    INDEX = "model.safetensors.index.json"

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str], shard_size: int, **_options):
        self.path = Path(path)
        groups = assign_shards(entries, shard_size)
        n = len(groups)
        self.writers = []
        self.shard_of: dict[str, SafetensorsWriter] = {}
        self.weight_map: dict[str, str] = {}
        for i, group in enumerate(groups, 1):
            shard_name = f"model-{i:05d}-of-{n:05d}.safetensors"
            writer = SafetensorsWriter(self.path / shard_name, group, metadata)
            self.writers.append(writer)
            for name, _, _ in group:
                self.shard_of[name] = writer
                self.weight_map[name] = shard_name
        self.tensor_bytes = sum(e[1].itemsize * _numel(e[2]) for e in entries)
        self.created_dirs: list[Path] = []

    @property
    def files(self) -> list[Path]:
        return [w.path for w in self.writers] + [self.path / self.INDEX]

    @property
    def total_size(self) -> int:
        return sum(w.total_size for w in self.writers)

    def open(self) -> None:
        self.created_dirs = make_directories(self.path)
        for writer in self.writers:
            writer.open()

    def write(self, name: str, element_offset: int, chunk: torch.Tensor) -> None:
        self.shard_of[name].write(name, element_offset, chunk)

    def copy(self, source: str, target: str, chunk_bytes: int) -> None:
        src, dst = self.shard_of[source], self.shard_of[target]
        if src is dst:
            src.copy_tensor(source, target, chunk_bytes)
            return
        position, remaining = src.data_start + src.offsets[source], src.sizes[source]
        written = 0
        while remaining:
            data = os.pread(src.fd, min(remaining, chunk_bytes), position)
            dst.write_at(data, dst.data_start + dst.offsets[target] + written)
            position, written, remaining = position + len(data), written + len(data), remaining - len(data)

    def commit(self) -> None:
        for writer in self.writers:
            writer.commit()
        index = {"metadata": {"total_size": self.tensor_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        tmp = self.path / f".{self.INDEX}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / self.INDEX)
        fsync_directory(self.path)

    def abort(self) -> None:
        for writer in self.writers:
            writer.abort()
        remove_directories(self.created_dirs)


@dataclass(frozen=True)
class OutputKind:
    name: str
    accepts: Callable[[Path], bool]
    factory: Callable[..., object]


OUTPUT_KINDS: list[OutputKind] = []


def register_output(name: str, accepts, factory) -> None:
    OUTPUT_KINDS.insert(0, OutputKind(name, accepts, factory))


register_output("sharded safetensors directory", lambda p: p.suffix == "" or p.is_dir(), ShardedOutput)
register_output("safetensors file", lambda p: p.suffix == ".safetensors", SafetensorsFileOutput)


def output_kind(path: Path) -> OutputKind:
    for kind in OUTPUT_KINDS:
        if kind.accepts(path):
            return kind
    raise OutputError(f"output '{path}': unknown kind; use a .safetensors file, a .pth/.pt file or a directory "
                      "(sharded safetensors).")


def make_output(path: Path, entries: list[Entry], metadata: dict[str, str], shard_size: int, **options):
    return output_kind(Path(path)).factory(Path(path), entries, metadata, shard_size=shard_size, **options)


def check_disk_space(path: Path, needed: int) -> None:
    directory = Path(path)
    while not directory.exists():
        directory = directory.parent
    if directory.is_file():
        directory = directory.parent
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise OutputError(f"output '{path}' needs {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free on "
                          f"{directory}; free some space or choose another output location.")
