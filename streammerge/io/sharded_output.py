"""A directory of Hugging Face shards: `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`,
or one `model.safetensors` without an index when everything fits in one shard (the transformers convention).

Shards are written in processing order. Each is finished as soon as its last tensor is written: fsynced,
renamed to a hidden `.NAME.done` and recorded in the resume ledger, so that a run killed half-way can be
resumed (`resume=True`) without redoing completed shards. `commit()` writes the companion files (config.json,
tokenizer, model card), removes the weight files of another model (another run's `model.safetensors`, shards
of another count, `pytorch_model*.bin`, their indexes: transformers would load them instead of, or mixed
with, the new ones), renames the shards into place and writes the index last; `abort()` removes everything
this run created.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from streammerge.errors import OutputError
from streammerge.interrupts import signals_deferred, uninterruptible
from streammerge.io.files import (fsync_directory, lock, make_directories, remove_directories,
                                  remove_stale_temporaries, unlink_if_present, write_atomically, write_error)
from streammerge.io.output_spec import Entry, OutputSpec
from streammerge.io.resume import MANIFEST, FileChecksum, ResumeLedger, file_digest, fingerprint
from streammerge.io.safetensors_io import SafetensorsWriter
from streammerge.io.single_file_output import safetensors_placements

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SHARD_NAME = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
# Weight files transformers looks for in a model directory (and the indexes that name shards).
WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)$"
                         r"|^(model\.safetensors|pytorch_model\.bin)\.index\.json$")
WAITING, WRITING, DONE, REUSED = "waiting", "writing", "done", "reused"


def shard_file_name(index: int, count: int) -> str:
    return SINGLE if count == 1 else f"model-{index:05d}-of-{count:05d}.safetensors"


def assign_shards(entries, shard_size: int) -> list[list[Entry]]:
    """Greedy split in processing order; a tensor larger than shard_size gets a shard of its own."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        nbytes = entry[1].itemsize * math.prod(entry[2])
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def shard_writers(spec: OutputSpec) -> list[SafetensorsWriter]:
    groups = assign_shards(spec.entries, spec.shard_size)
    return [SafetensorsWriter(Path(spec.path) / shard_file_name(i, len(groups)), group, spec.metadata)
            for i, group in enumerate(groups, 1)]


def weight_file_names(spec: OutputSpec) -> list[str]:
    """The weight files a directory output will hold: its shards, and the index when there are several."""
    names = [writer.path.name for writer in shard_writers(spec)]
    return names + ([INDEX] if len(names) > 1 else [])


def stale_weight_files(directory: Path, ours: set[str]) -> list[Path]:
    """Weight files in `directory` that are not among `ours` (names): another model's, removed at commit."""
    try:
        return sorted(e for e in Path(directory).iterdir() if WEIGHT_FILE.match(e.name) and e.name not in ours)
    except (FileNotFoundError, NotADirectoryError):
        return []


def sharded_layout(spec: OutputSpec):
    files, placements = [], {}
    for i, writer in enumerate(shard_writers(spec)):
        file, where = safetensors_placements(writer, i)
        files.extend(file)
        placements.update(where)
    return tuple(files), placements


class _Shard:
    """One shard file and where it stands: waiting, being written, done (complete under the hidden name
    `.NAME.done`, awaiting commit) or reused (complete from an interrupted run, verified)."""

    def __init__(self, writer: SafetensorsWriter):
        self.name = writer.path.name
        self.writer = writer
        self.done_path = writer.path.with_name(f".{self.name}.done")
        self.location: Path | None = None  # where the complete file is now
        self.unfinished = {n for n, size in writer.sizes.items() if size}
        self.checksum = FileChecksum(writer.header, writer.offsets, writer.sizes)
        self.state = WAITING

    def digest_of(self, path: Path) -> str | None:
        return file_digest(path, self.writer.header, self.writer.offsets, self.writer.sizes)

    def verify(self, record) -> Path | None:
        """Where a complete copy of this shard matching `record` (size, checksum) is, if anywhere."""
        if not isinstance(record, dict):
            return None
        for candidate in (self.done_path, self.writer.path):
            try:
                size = os.stat(candidate).st_size
            except OSError:
                continue
            if size == record.get("size") == self.writer.total_size and record.get("checksum") == self.digest_of(
                    candidate):
                return candidate
        return None


class ShardedOutput:
    keeps_checksums = True

    def __init__(self, spec: OutputSpec, resume: bool = False):
        self.spec = spec
        self.path = Path(spec.path)
        self.shards = [_Shard(writer) for writer in shard_writers(spec)]
        self.shard_of: dict[str, _Shard] = {name: s for s in self.shards for name in s.writer.offsets}
        self.resume = resume
        self.ledger = ResumeLedger(self.path, fingerprint([s.writer.header for s in self.shards],
                                                          spec.resume.files, spec.resume.seed))
        self.created_dirs: list[Path] = []
        self.directory_fd = -1
        self.placed: list[Path] = []  # files this run renamed into their final place
        self.notes: list[str] = []
        self.indexed = len(self.shards) > 1

    @property
    def files(self) -> list[Path]:
        return ([s.writer.path for s in self.shards] + ([self.path / INDEX] if self.indexed else [])
                + [self.path / name for name in self.spec.companions])

    def stale_weights(self) -> list[Path]:
        """Weight files already in the directory that are not part of this output: removed at commit."""
        return stale_weight_files(self.path, {p.name for p in self.files})

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
        return self.shard_of[name].state == REUSED

    def _is_ours(self, name: str) -> bool:
        return bool(SHARD_NAME.match(name)) or name in (INDEX, MANIFEST) or name in self.spec.companions

    # -- start: clean up after an interrupted run, or resume it -----------------------------------------------
    def open(self) -> None:
        self.ledger.load(self.resume)
        self.created_dirs = make_directories(self.path)
        # Held until commit or abort: a second run into this directory is refused rather than interleaved.
        self.directory_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        lock(self.directory_fd, self.path)
        removed = len(remove_stale_temporaries(self.path, self._is_ours))
        if self.ledger.start(self.resume):
            for shard in self.shards:
                shard.location = shard.verify(self.ledger.previous_record(shard.name))
                if shard.location is not None:
                    shard.state = REUSED
                    self.ledger.reuse(shard.name)
        elif self.resume:
            self.notes.append(f"--resume: no interrupted merge to continue in '{self.path}'; merging from the start.")
        elif self.ledger.previous is not None:
            removed += 1  # its manifest
        keep = {s.location for s in self.shards if s.state == REUSED}
        for entry in os.scandir(self.path):
            if (entry.name.startswith(".") and entry.name.endswith(".done") and SHARD_NAME.match(entry.name[1:-5])
                    and Path(entry.path) not in keep):
                os.unlink(entry.path)
                removed += 1
        if removed:
            self.notes.append(f"removed {removed} file(s) an interrupted merge left in '{self.path}'.")
        if self.ledger.resumed:
            reused = sum(s.state == REUSED for s in self.shards)
            self.notes.append(f"--resume: {reused} of {len(self.shards)} shard(s) already complete and verified; "
                              "merging the rest.")

    def create_files(self) -> None:
        for shard in self.shards:
            self._start(shard)

    def _start(self, shard: _Shard) -> None:
        if shard.state == WAITING:
            shard.writer.open()
            shard.state = WRITING

    # -- writing (on the engine's writer thread) -----------------------------------------------------------
    def write(self, name: str, element_offset: int, chunk: torch.Tensor) -> None:
        if chunk.numel() == 0:  # an empty tensor has nothing to write (its shard may be finished already)
            return
        data = chunk.contiguous().view(torch.uint8).numpy()
        self._write(self.shard_of[name], name, element_offset * chunk.element_size(), data)

    def _write(self, shard: _Shard, name: str, byte_offset: int, data) -> None:
        self._start(shard)
        shard.writer.write_bytes(name, byte_offset, data)
        if shard.checksum.update(name, byte_offset, data):
            self._tensor_done(shard, name)

    def record_checksum(self, name: str, crc: int) -> None:
        shard = self.shard_of[name]
        shard.checksum.record(name, crc)
        self._tensor_done(shard, name)

    def _tensor_done(self, shard: _Shard, name: str) -> None:
        shard.unfinished.discard(name)
        if not shard.unfinished and shard.state in (WAITING, WRITING):
            self._finish(shard)

    def _finish(self, shard: _Shard) -> None:
        """fsync the complete shard, rename it to its hidden name and record it in the ledger."""
        if shard.state == WAITING:  # only empty tensors: nothing was written yet
            shard.writer.open()
        digest = shard.checksum.digest(shard.writer.fd)
        # Whole or not at all, even when a write on the main thread finishes the shard and Ctrl-C arrives: a
        # renamed shard that abort() does not know of, or that the ledger lacks, would be left behind.
        with signals_deferred():
            shard.writer.commit(shard.done_path)
            shard.state, shard.location = DONE, shard.done_path
            self.ledger.record(shard.name, shard.writer.total_size, digest)

    def copy(self, source: str, target: str, chunk_bytes: int) -> None:
        """Write tied tensor `target` with the bytes already written for `source` (possibly in a finished or
        reused shard)."""
        src, dst = self.shard_of[source], self.shard_of[target]
        remaining = src.writer.sizes[source]
        if not remaining:
            return
        position = src.writer.position(source)
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
        weight_map = {name: shard.name for name, shard in self.shard_of.items()}
        index = {"metadata": {"total_size": self.spec.tensor_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        stale = self.stale_weights()
        with uninterruptible():  # milliseconds; an interrupt half-way would leave files abort() cannot see
            for name, data in self.spec.companions.items():
                try:
                    write_atomically(self.path / name, data)
                except OSError as exc:
                    raise write_error(self.path / name, exc) from None
                self.placed.append(self.path / name)
            # Before the new weights appear, so that no old entry point (an index, model.safetensors,
            # pytorch_model.bin) is ever beside them to be loaded instead.
            for path in stale:
                unlink_if_present(path)
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
            if self.indexed:
                try:
                    write_atomically(self.path / INDEX, json.dumps(index, indent=2) + "\n")
                except OSError as exc:
                    raise write_error(self.path / INDEX, exc) from None
                self.placed.append(self.path / INDEX)
        if stale:
            self.notes.append(f"removed {len(stale)} weight file(s) of another model from '{self.path}' (they would "
                              f"have been loaded instead of the new weights): {', '.join(p.name for p in stale)}.")
        self.ledger.finish()
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
                    unlink_if_present(shard.location)
            for path in self.placed:
                unlink_if_present(path)
            self.ledger.abort([s.name for s in self.shards if s.state == REUSED])
            remove_directories(self.created_dirs)
            self._unlock()
