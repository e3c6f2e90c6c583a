"""The seam between the plan and the writers: what an output will hold (`OutputSpec`, built once from the plan)
and what every output kind does (`Output`).

A spec says which file each tensor's bytes go to and at which byte offset, so writing is independent of who
writes: the engine writes through an `Output`; another process could open `OutputFile.temporary` (created by
`Output.open()`/`Output.create_files()`) and `pwrite` a tensor's bytes at `TensorPlacement.offset`, reporting
their crc32 back (`Output.record_checksum`) before the owner of the `Output` commits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

Entry = tuple[str, torch.dtype, tuple]  # (name, dtype, shape)


@dataclass(frozen=True)
class OutputFile:
    path: Path  # final name
    temporary: Path  # where it is built until commit (`.NAME.tmp-PID`, PID of the process that creates it)
    size: int  # bytes once complete


@dataclass(frozen=True, slots=True)  # one per output tensor
class TensorPlacement:
    """Where one tensor's bytes go: file `spec.files[file]`, bytes [offset, offset + nbytes). Tied tensors
    that share storage in the file format (.pth) share one placement."""

    file: int
    offset: int
    nbytes: int


# How a .pth output lays out the state dict and the metadata (config key `pth_container`): like the inputs,
# as Coqui's loader reads it ({"model": ...} beside config/step/epoch/model_loss), or the bare state dict.
PTH_CONTAINERS = ("auto", "coqui", "plain")


@dataclass(frozen=True)
class TorchContainer:
    """What a .pth output's content around the state dict is derived from: the inputs' container key (dotted
    path of their state dict, "" when they are bare state dicts), each model's metadata and its `weight`, and
    the layout asked for (one of PTH_CONTAINERS)."""

    key: str = ""
    model_metadata: tuple[dict, ...] = ()
    model_weights: tuple = ()
    layout: str = "auto"


@dataclass(frozen=True)
class ResumeInputs:
    """What a resumed run must find unchanged besides the recipe: the input files and the seed."""

    files: tuple[Path, ...] = ()
    seed: int = 0


@dataclass(frozen=True)
class OutputSpec:
    kind: str  # the name of an output kind in `outputs.OUTPUT_KINDS`
    path: Path  # what the user named: a file, or a directory
    entries: tuple[Entry, ...]  # every output tensor, aliases included, in processing order
    metadata: dict[str, str]  # safetensors `__metadata__`
    aliases: dict[str, str]  # tied tensor -> the tensor whose bytes it repeats
    files: tuple[OutputFile, ...]  # files holding tensor bytes (an index, if any, is not listed)
    placements: dict[str, TensorPlacement]
    shard_size: int = 0  # sharded kinds: the most tensor bytes per file
    container: TorchContainer = TorchContainer()
    resume: ResumeInputs = ResumeInputs()
    # Directory kinds: other files placed with the weights at commit (config.json, tokenizer, model card)
    companions: dict[str, bytes] = field(default_factory=dict)

    @property
    def tensor_bytes(self) -> int:
        return sum(dtype.itemsize * math.prod(shape) for _, dtype, shape in self.entries)


class TensorSink(Protocol):
    """Where the engine puts merged tensors: an `Output`, or a task of a distributed merge writing into files
    another process created."""

    def write(self, name: str, element_offset: int, chunk: torch.Tensor) -> None:
        """Write a contiguous chunk of tensor `name` starting at element `element_offset`."""

    def copy(self, source: str, target: str, chunk_bytes: int) -> None:
        """Write tied tensor `target` with the bytes already written for `source`."""


class Output(TensorSink, Protocol):
    """An output under construction. Nothing appears at `spec.path` before `commit()`; `abort()` leaves the
    destination as it was found. Call order: open, (write | copy)*, commit — or abort at any point."""

    spec: OutputSpec
    notes: list[str]  # what the user should know (debris removed, resume state)
    # Whether record_checksum uses its crc (resume manifest, zip records); when not, writers elsewhere skip it.
    keeps_checksums: bool

    @property
    def files(self) -> list[Path]:
        """Every file the output creates or replaces (final names)."""

    @property
    def total_size(self) -> int:
        """Bytes of the complete output."""

    @property
    def space_needed(self) -> int:
        """Bytes still to write (after `open`): less than `total_size` when a resume reuses files."""

    @property
    def reused_files(self) -> list[str]:
        """Files kept from an interrupted run (after `open`)."""

    def open(self) -> None:
        """Lock the destination, remove an interrupted run's debris or verify what it completed (resume)."""

    def reused(self, name: str) -> bool:
        """Whether tensor `name` is already in a file an interrupted run completed (nothing to compute)."""

    def create_files(self) -> None:
        """Create every temporary file still to be written, with its headers (for writers in other processes;
        `write` creates files on first use)."""

    def write(self, name: str, element_offset: int, chunk: torch.Tensor) -> None:
        """Write a contiguous chunk of tensor `name` starting at element `element_offset`."""

    def record_checksum(self, name: str, crc: int) -> None:
        """Tensor `name` was written whole into its temporary file by someone else; `crc` is the crc32 of its
        bytes."""

    def copy(self, source: str, target: str, chunk_bytes: int) -> None:
        """Write tied tensor `target` with the bytes already written for `source`."""

    def commit(self) -> None:
        """Finish every file and move the output into place."""

    def abort(self) -> None:
        """Remove everything this run created."""
