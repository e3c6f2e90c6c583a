"""Output kinds, chosen from the output path: one safetensors file, or a directory of Hugging Face shards.

Every output is built under temporary names next to its destination and appears only on `commit()`;
`abort()` leaves the destination as it was found. A sharded output can also resume an interrupted run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from streammerge.errors import OutputError
from streammerge.interrupts import uninterruptible
from streammerge.io.partial import (MANIFEST, Manifest, ShardChecksum, explain_difference, file_digest, fingerprint,
                                    fsync_directory, lock, remove_stale_temporaries, write_atomically, write_error)
from streammerge.io.safetensors_io import SafetensorsWriter, start_writeback
from streammerge.units import format_size

Entry = tuple[str, torch.dtype, tuple]  # (name, dtype, shape)


class SingleFileOutput:
    """An output that is one file, written whole by `self.writer` (an AtomicFile subclass)."""

    def __init__(self, path: Path, resume: bool = False):
        self.path = Path(path)
        self.created_dirs: list[Path] = []
        self.notes: list[str] = []
        if resume:
            self.notes.append(f"--resume: '{self.path}' is a single file, which is always written whole; "
                              "merging from the start (a directory output can be resumed shard by shard).")

    @property
    def files(self) -> list[Path]:
        return [self.path]

    @property
    def total_size(self) -> int:
        return self.writer.total_size

    def open(self) -> None:
        self.created_dirs = make_directories(self.path.parent)
        if remove_stale_temporaries(self.path.parent, lambda name: name == self.path.name):
            self.notes.append(f"removed the temporary file an interrupted merge left beside '{self.path}'.")
        self.writer.open()

    def reused(self, name: str) -> bool:
        return False

    def commit(self) -> None:
        self.writer.commit()

    def abort(self) -> None:
        with uninterruptible():
            self.writer.abort()
            remove_directories(self.created_dirs)


class SafetensorsFileOutput(SingleFileOutput):
    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str], resume: bool = False, **_options):
        super().__init__(path, resume)
        self.writer = SafetensorsWriter(self.path, entries, metadata)

    def write(self, name: str, element_offset: int, chunk: torch.Tensor) -> None:
        self.writer.write(name, element_offset, chunk)

    def copy(self, source: str, target: str, chunk_bytes: int) -> None:
        self.writer.copy_tensor(source, target, chunk_bytes)


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


SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
WAITING, WRITING, DONE, REUSED = "waiting", "writing", "done", "reused"


def shard_file_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


class _Shard:
    """One shard file and where it stands: waiting, being written, done (complete under the hidden name
    `.NAME.done`, awaiting commit) or reused (complete from an interrupted run, verified)."""

    def __init__(self, directory: Path, name: str, writer: SafetensorsWriter):
        self.name = name
        self.writer = writer
        self.done_path = directory / f".{name}.done"
        self.location: Path | None = None  # where the complete file is now
        self.unfinished = {n for n, size in writer.sizes.items() if size}
        self.checksum = ShardChecksum(writer.header, writer.data_start, writer.offsets, writer.sizes)
        self.state = WAITING

    def verify(self, record) -> Path | None:
        """Where a complete copy of this shard matching `record` (size, checksum) is, if anywhere."""
        if not isinstance(record, dict):
            return None
        for candidate in (self.done_path, self.writer.path):
            try:
                size = os.stat(candidate).st_size
            except OSError:
                continue
            if size == record.get("size") == self.writer.total_size and record.get("checksum") == file_digest(
                    candidate, self.writer.header, self.writer.offsets, self.writer.sizes):
                return candidate
        return None


class ShardedOutput:
    """`model-0000i-of-0000N.safetensors` shards plus `model.safetensors.index.json`.

    Shards are written in processing order. Each is finished as soon as its last tensor is written: fsynced,
    renamed to a hidden `.NAME.done` and recorded (size, checksum) in the manifest, so that a run killed
    half-way can be resumed (`resume=True`) without redoing completed shards. `commit()` renames the shards
    into place and writes the index last; `abort()` removes everything this run created.
    """

    INDEX = "model.safetensors.index.json"

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str], shard_size: int,
                 resume: bool = False, prepared=None, **_options):
        self.path = Path(path)
        groups = assign_shards(entries, shard_size)
        self.shards: list[_Shard] = []
        self.shard_of: dict[str, _Shard] = {}
        self.weight_map: dict[str, str] = {}
        for i, group in enumerate(groups, 1):
            name = shard_file_name(i, len(groups))
            shard = _Shard(self.path, name, SafetensorsWriter(self.path / name, group, metadata))
            self.shards.append(shard)
            for entry in group:
                self.shard_of[entry[0]] = shard
                self.weight_map[entry[0]] = name
        self.tensor_bytes = sum(e[1].itemsize * _numel(e[2]) for e in entries)
        self.resume = resume
        self.fingerprint = fingerprint(prepared, [s.writer.header for s in self.shards])
        self.manifest: Manifest | None = None  # this run's record of complete shards
        self.manifest_predates_run = False
        self.previous_index: set[str] = set()
        self.created_dirs: list[Path] = []
        self.directory_fd = -1
        self.placed: list[Path] = []  # files this run renamed into their final place
        self.notes: list[str] = []

    @property
    def files(self) -> list[Path]:
        return [s.writer.path for s in self.shards] + [self.path / self.INDEX]

    @property
    def total_size(self) -> int:
        return sum(s.writer.total_size for s in self.shards)

    @property
    def space_needed(self) -> int:
        return sum(s.writer.total_size for s in self.shards if s.state != REUSED)

    @property
    def reused_files(self) -> list[str]:
        return [str(s.writer.path) for s in self.shards if s.state == REUSED]

    def reused(self, name: str) -> bool:
        """Whether tensor `name` is already in a verified shard of an interrupted run (nothing to compute)."""
        return self.shard_of[name].state == REUSED

    def _is_ours(self, name: str) -> bool:
        return bool(SHARD_NAME.match(name)) or name in (self.INDEX, MANIFEST)

    # -- start: clean up after an interrupted run, or resume it -----------------------------------------------
    def open(self) -> None:
        previous = Manifest.load(self.path)
        if self.resume and previous is not None:
            why = explain_difference(previous.fingerprint, self.fingerprint)
            if why:
                raise OutputError(
                    f"--resume: '{self.path}' holds an interrupted merge that this one cannot continue: {why}. "
                    "Run without --resume to start over (its partial output is then removed).")
        self.created_dirs = make_directories(self.path)
        # Held until commit or abort: a second run into this directory is refused rather than interleaved.
        self.directory_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        lock(self.directory_fd, self.path)
        removed = len(remove_stale_temporaries(self.path, self._is_ours))
        if self.resume and previous is not None:
            self.manifest, self.manifest_predates_run = Manifest(self.fingerprint), True
            for shard in self.shards:
                shard.location = shard.verify(previous.completed.get(shard.name))
                if shard.location is not None:
                    shard.state = REUSED
                    self.manifest.completed[shard.name] = previous.completed[shard.name]
        elif self.resume:
            self.notes.append(f"--resume: no interrupted merge to continue in '{self.path}'; merging from the start.")
        elif previous is not None:
            os.unlink(self.path / MANIFEST)
            removed += 1
        keep = {s.location for s in self.shards if s.state == REUSED}
        for entry in os.scandir(self.path):
            if (entry.name.startswith(".") and entry.name.endswith(".done") and SHARD_NAME.match(entry.name[1:-5])
                    and Path(entry.path) not in keep):
                os.unlink(entry.path)
                removed += 1
        if removed:
            self.notes.append(f"removed {removed} file(s) an interrupted merge left in '{self.path}'.")
        reused = sum(s.state == REUSED for s in self.shards)
        if self.resume and previous is not None:
            self.notes.append(f"--resume: {reused} of {len(self.shards)} shard(s) already complete and verified; "
                              "merging the rest.")
        self.previous_index = self._read_index_names()

    def _read_index_names(self) -> set[str]:
        try:
            weight_map = json.loads((self.path / self.INDEX).read_text(encoding="utf-8")).get("weight_map", {})
            return {n for n in weight_map.values() if isinstance(n, str)}
        except (OSError, ValueError, AttributeError):
            return set()

    # -- writing (on the engine's writer thread) -----------------------------------------------------------
    def write(self, name: str, element_offset: int, chunk: torch.Tensor) -> None:
        data = chunk.contiguous().view(torch.uint8).numpy() if chunk.numel() else b""
        self._write(self.shard_of[name], name, element_offset * chunk.element_size(), data)

    def _write(self, shard: _Shard, name: str, byte_offset: int, data) -> None:
        if shard.state == WAITING:
            shard.writer.open()
            shard.state = WRITING
        position = shard.writer.data_start + shard.writer.offsets[name] + byte_offset
        shard.writer.write_at(data, position)
        start_writeback(shard.writer.fd, position, len(data))
        if shard.checksum.update(name, byte_offset, data):
            shard.unfinished.discard(name)
            if not shard.unfinished:
                self._finish(shard)

    def _finish(self, shard: _Shard) -> None:
        """fsync the complete shard, rename it to its hidden name and record it in the manifest."""
        if shard.state == WAITING:  # only empty tensors: nothing was written yet
            shard.writer.open()
        digest = shard.checksum.digest(shard.writer.fd)
        shard.writer.commit(shard.done_path)
        shard.state, shard.location = DONE, shard.done_path
        if self.manifest is None:
            self.manifest = Manifest(self.fingerprint)
        self.manifest.completed[shard.name] = {"size": shard.writer.total_size, "checksum": digest}
        self._save_manifest()

    def _save_manifest(self) -> None:
        try:
            self.manifest.save(self.path)
        except OSError as exc:
            raise write_error(self.path / MANIFEST, exc) from None

    def copy(self, source: str, target: str, chunk_bytes: int) -> None:
        """Write tied tensor `target` with the bytes already written for `source` (possibly in a finished or
        reused shard)."""
        src, dst = self.shard_of[source], self.shard_of[target]
        remaining = src.writer.sizes[source]
        if not remaining:
            return
        position = src.writer.data_start + src.writer.offsets[source]
        own_fd = src.state != WRITING
        fd = os.open(src.location, os.O_RDONLY | os.O_CLOEXEC) if own_fd else src.writer.fd
        written = 0
        try:
            while remaining:
                data = os.pread(fd, min(remaining, chunk_bytes), position + written)
                if not data:
                    raise OutputError(f"'{src.location}' ended early while copying '{source}' to '{target}'.")
                self._write(dst, target, written, data)
                written, remaining = written + len(data), remaining - len(data)
        finally:
            if own_fd:
                os.close(fd)

    # -- the end ---------------------------------------------------------------------------------------------
    def commit(self) -> None:
        for shard in self.shards:
            if shard.state in (WAITING, WRITING):
                if shard.unfinished:
                    raise RuntimeError(f"internal error: shard {shard.name} lacks {sorted(shard.unfinished)[:3]}")
                self._finish(shard)
        index = {"metadata": {"total_size": self.tensor_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        with uninterruptible():  # milliseconds; an interrupt half-way would leave files abort() cannot see
            try:
                for shard in self.shards:
                    final = shard.writer.path
                    if shard.location != final:
                        os.replace(shard.location, final)
                        shard.location = final
                        if shard.state != REUSED:
                            self.placed.append(final)
                fsync_directory(self.path)
            except OSError as exc:
                raise write_error(self.path, exc) from None
            try:
                write_atomically(self.path / self.INDEX, json.dumps(index, indent=2) + "\n")
            except OSError as exc:
                raise write_error(self.path / self.INDEX, exc) from None
            self.placed.append(self.path / self.INDEX)
        # The output is complete. Shards only a replaced index listed are stale; the manifest is done with.
        for name in sorted(self.previous_index - set(self.weight_map.values())):
            if SHARD_NAME.match(name):
                _unlink(self.path / name)
        _unlink(self.path / MANIFEST)
        fsync_directory(self.path)
        self._unlock()

    def _unlock(self) -> None:
        if self.directory_fd >= 0:
            os.close(self.directory_fd)
            self.directory_fd = -1

    def abort(self) -> None:
        """Leave the output directory as this run found it (a resumed run keeps the shards it reused)."""
        with uninterruptible():
            for shard in self.shards:
                if shard.state == WRITING:
                    shard.writer.abort()
                elif shard.state == DONE:
                    _unlink(shard.location)
            for path in self.placed:
                _unlink(path)
            reused = {s.name: self.manifest.completed[s.name] for s in self.shards if s.state == REUSED}
            if self.manifest_predates_run and reused:
                try:
                    Manifest(self.fingerprint, reused).save(self.path)
                except OSError:
                    pass
            elif self.manifest is not None:
                _unlink(self.path / MANIFEST)
            remove_directories(self.created_dirs)
            self._unlock()


def _unlink(path: Path | None) -> None:
    if path is None:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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
        raise OutputError(f"output '{path}' needs {format_size(needed)} but only {format_size(free)} is free on "
                          f"{directory}; free some space or choose another output location. Nothing was written.")
