"""Outputs that are one file, written whole: the base every single-file kind shares, and one safetensors file."""

from __future__ import annotations

from pathlib import Path

import torch

from streammerge.interrupts import uninterruptible
from streammerge.io.files import make_directories, remove_directories, remove_stale_temporaries
from streammerge.io.output_spec import OutputFile, OutputSpec, TensorPlacement
from streammerge.io.safetensors_io import SafetensorsWriter


class SingleFileOutput:
    """An output that is one file, written whole by `self.writer` (an AtomicFile with `open()`)."""

    def __init__(self, spec: OutputSpec, writer, resume: bool = False):
        self.spec = spec
        self.path = Path(spec.path)
        self.writer = writer
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

    @property
    def space_needed(self) -> int:
        return self.writer.total_size

    @property
    def reused_files(self) -> list[str]:
        return []

    def open(self) -> None:
        self.created_dirs = make_directories(self.path.parent)
        if remove_stale_temporaries(self.path.parent, lambda name: name == self.path.name):
            self.notes.append(f"removed the temporary file an interrupted merge left beside '{self.path}'.")
        self.writer.open()

    def create_files(self) -> None:
        """The file was created by `open()`."""

    def reused(self, name: str) -> bool:
        return False

    def commit(self) -> None:
        self.writer.commit()

    def abort(self) -> None:
        with uninterruptible():
            self.writer.abort()
            remove_directories(self.created_dirs)


def safetensors_file_layout(spec: OutputSpec) -> tuple[tuple[OutputFile, ...], dict[str, TensorPlacement]]:
    return safetensors_placements(SafetensorsWriter(spec.path, list(spec.entries), spec.metadata), 0)


def safetensors_placements(writer: SafetensorsWriter, file: int):
    """The file a safetensors writer builds and where each of its tensors goes, as spec parts."""
    placements = {name: TensorPlacement(file, writer.position(name), writer.sizes[name]) for name in writer.offsets}
    return (OutputFile(writer.path, writer.tmp_path, writer.total_size),), placements


class SafetensorsFileOutput(SingleFileOutput):
    keeps_checksums = False

    def __init__(self, spec: OutputSpec, resume: bool = False):
        super().__init__(spec, SafetensorsWriter(spec.path, list(spec.entries), spec.metadata), resume)

    def write(self, name: str, element_offset: int, chunk: torch.Tensor) -> None:
        self.writer.write(name, element_offset, chunk)

    def write_run(self, names: list[str], chunk: torch.Tensor) -> None:
        """Write whole tensors `names`, whose bytes follow each other in `chunk`: one write when they also
        follow each other in the file (small tensors of one dtype do), else one per tensor."""
        writer, data = self.writer, chunk.contiguous().view(torch.uint8).numpy()
        end = writer.offsets[names[0]]
        for name in names:
            if writer.offsets[name] != end:
                break
            end += writer.sizes[name]
        else:
            writer.write_bytes(names[0], 0, data)
            return
        done = 0
        for name in names:
            writer.write_bytes(name, 0, data[done:done + writer.sizes[name]])
            done += writer.sizes[name]

    def record_checksum(self, name: str, crc: int) -> None:
        """A single safetensors file keeps no checksums."""

    def copy(self, source: str, target: str, chunk_bytes: int) -> None:
        self.writer.copy_tensor(source, target, chunk_bytes)
