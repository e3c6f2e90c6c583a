"""One task of a distributed merge, as it runs in a worker process (local or on a Ray node): open the inputs,
rebuild the plan, merge the task's tensors under the task's own RAM budget and write them at their places in the
output files the driver created; return what the driver needs to finish (checksums, non-finite tensors, bytes
read, peak RAM). No tensor data goes back to the driver.

A task only ever writes its own tensors' bytes at fixed offsets, so running it twice (a retry after a worker
died) writes the same bytes again."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import socket
import sys
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from streammerge.errors import OutputError, StreamMergeError
from streammerge.io.files import WriteBehind, pwrite_all
from streammerge.io.output_spec import OutputSpec
from streammerge.memory import MemoryGuard, anon_rss


@dataclass(frozen=True)
class Placement:
    """Where one output tensor's bytes go: `nbytes` bytes at byte `position` of the file at `path` (the
    temporary file the driver created; `OutputSpec.placements` with the file resolved)."""

    path: str
    position: int
    nbytes: int

    @classmethod
    def all_of(cls, spec: OutputSpec) -> dict[str, "Placement"]:
        return {name: cls(str(spec.files[p.file].temporary), p.offset, p.nbytes) for name, p in spec.placements.items()}


@dataclass(frozen=True)
class FileStat:
    """An input file as the driver sees it; every worker must see the same (a shared file system)."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path) -> "FileStat":
        st = os.stat(path)
        return cls(str(path), st.st_size, st.st_mtime_ns)


@dataclass
class MergeJob:
    """What every task of one merge shares. Picklable: the method travels by name."""

    config: dict  # the MergeConfig's fields, `method` as its name
    output: str
    task_ram: int  # each task's RAM budget (max_ram of the process that runs it)
    allow_nonfinite: bool
    placements: dict[str, Placement]
    inputs: list[FileStat]
    outputs: list[FileStat]  # the files the driver created, as it sees them
    sync: bool = True  # each task fsyncs what it wrote (see Executor.tasks_sync)
    checksums: bool = True  # each task returns its tensors' crc32 (see Output.keeps_checksums)
    reserve: int = 0  # bytes of task_ram each task leaves to the process it runs in (see Executor.task_reserve)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def of(cls, config, output: Path, task_ram: int, allow_nonfinite: bool, placements: dict[str, Placement],
           inputs: list[Path], sync: bool = True, checksums: bool = True, reserve: int = 0) -> "MergeJob":
        state = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        state["method"] = config.method.name
        files = sorted({p.path for p in placements.values()})
        return cls(state, str(output), task_ram, allow_nonfinite, dict(placements),
                   [FileStat.of(p) for p in inputs if os.path.isfile(p)], [FileStat.of(p) for p in files], sync,
                   checksums, reserve)

    def merge_config(self):
        from streammerge.config import MergeConfig
        from streammerge.methods.registry import get_method

        return MergeConfig(**{**self.config, "method": get_method(self.config["method"])})


@dataclass(frozen=True)
class Group:
    """The tensors (plan task names, in plan order) one task merges; `reused` are already in place (resume)."""

    names: tuple[str, ...]
    reused: frozenset[str] = frozenset()


@dataclass
class GroupResult:
    checksums: dict[str, int]  # crc32 of each tensor's bytes as written (aliases included), if the output keeps them
    nonfinite: list[str]
    read_bytes: int
    peak_anon_bytes: int
    seconds: float
    pid: int
    node: str


def node_name() -> str:
    """This machine as messages name it: the Ray node (id and address) when inside Ray, else the host name."""
    ray = sys.modules.get("ray")  # never imported just to ask: it is slow to import
    try:
        if ray is not None and ray.is_initialized():
            context = ray.get_runtime_context()
            return f"Ray node {context.get_node_id()[:12]} ({ray.util.get_node_ip_address()}, {socket.gethostname()})"
    except Exception:  # noqa: BLE001 - any failure just means: not inside Ray
        pass
    return f"host {socket.gethostname()}"


def check_same_files(job: MergeJob, outputs: bool = True) -> None:
    """Refuse unless this machine sees the driver's input (and output) files at the same paths, unchanged."""
    for expected, what in [(f, "input") for f in job.inputs] + [(f, "output") for f in job.outputs if outputs]:
        try:
            seen = FileStat.of(expected.path)
        except OSError as exc:
            problem = f"cannot see it ({exc.strerror})"
        else:
            if seen.size == expected.size and (what == "output" or seen.mtime_ns == expected.mtime_ns):
                continue
            problem = (f"sees a different file (size {seen.size}, modified {seen.mtime_ns}; the driver sees size "
                       f"{expected.size}, modified {expected.mtime_ns})")
        raise StreamMergeError(
            f"{node_name()} {problem} at the {what} path {expected.path}. Every machine of a distributed merge must "
            "see the inputs and the output directory at the same paths (a shared file system such as NFS, mounted "
            "at the same place on every node); fix the mounts or run without --ray. Nothing was written to the "
            "output path.")


class TaskOutput:
    """Writes a task's tensors at their placements (pwrite into files the driver created; never creates a file)
    and computes each tensor's crc32 as its chunks go by, in order (if `checksums`: 1.8 GB/s of one core)."""

    def __init__(self, placements: dict[str, Placement], checksums: bool = True):
        self.placements = placements
        self.checksums = checksums
        self.fds: dict[str, int] = {}
        self.behind: dict[str, WriteBehind] = {}  # per file: writeback as it goes, pages let go behind
        self.crc: dict[str, int] = {}
        self.covered: dict[str, int] = {}

    def _fd(self, path: str) -> int:
        if path not in self.fds:
            try:
                self.fds[path] = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                self.behind[path] = WriteBehind(self.fds[path])
            except OSError as exc:
                raise OutputError(f"{node_name()} cannot open the output file {path} the driver created "
                                  f"({exc.strerror}); the output directory must be on a file system every "
                                  "machine shares, at the same path.") from None
        return self.fds[path]

    def _put(self, name: str, byte_offset: int, data) -> None:
        place = self.placements[name]
        view = memoryview(data).cast("B")
        if byte_offset + len(view) > place.nbytes:
            raise ValueError(f"internal error: write past the end of '{name}'")
        fd, position = self._fd(place.path), place.position + byte_offset
        try:
            pwrite_all(fd, view, position)
            self.behind[place.path].written(position, len(view))
        except OSError as exc:
            raise OutputError(f"cannot write '{place.path}' on {node_name()}: {exc.strerror}. The partial output "
                              "is removed.") from None
        if self.covered.get(name, 0) == byte_offset:  # chunks come in order: the checksum grows with them
            if self.checksums:
                self.crc[name] = zlib.crc32(view, self.crc.get(name, 0))
            self.covered[name] = byte_offset + len(view)

    def write(self, name: str, element_offset: int, chunk: torch.Tensor) -> None:
        data = chunk.reshape(-1).contiguous().view(torch.uint8).numpy() if chunk.numel() else b""
        self._put(name, element_offset * chunk.element_size(), data)

    def copy(self, source: str, target: str, chunk_bytes: int) -> None:
        """Write tied tensor `target` with `source`'s bytes (nothing to do where they share a place)."""
        src, dst = self.placements[source], self.placements[target]
        if (src.path, src.position) == (dst.path, dst.position):
            self.crc[target], self.covered[target] = self.checksum(source), dst.nbytes
            return
        fd = self._fd(src.path) if src.path in self.fds else os.open(src.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            done = 0
            while done < src.nbytes:
                data = os.pread(fd, min(src.nbytes - done, chunk_bytes), src.position + done)
                if not data:
                    raise OutputError(f"'{src.path}' ended early while copying '{source}' to '{target}'.")
                self._put(target, done, data)
                done += len(data)
        finally:
            if src.path not in self.fds:
                os.close(fd)

    def checksum(self, name: str) -> int:
        if self.covered.get(name, 0) != self.placements[name].nbytes:
            raise RuntimeError(f"internal error: '{name}' was not written whole")
        return self.crc.get(name, 0)

    def finish(self) -> None:
        """fsync what this task wrote (the driver commits only what is on disk)."""
        for path, fd in self.fds.items():
            try:
                os.fsync(fd)
            except OSError as exc:
                raise OutputError(f"cannot write '{path}' on {node_name()}: {exc.strerror}.") from None

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.behind.clear()


class _Count:
    """Stands in for the progress bar inside a task: the driver shows progress as tasks report."""

    def __init__(self):
        self.n = 0

    def update(self, n: int) -> None:
        self.n += n


_prepared: dict[str, object] = {}  # this process's inputs and plan for the job it last ran (tasks come in series)


def _prepared_for(job: MergeJob):
    from streammerge.engine import prepare

    if job.id not in _prepared:
        for old in _prepared.values():
            old.close()
        _prepared.clear()
        _prepared[job.id] = prepare(job.merge_config(), Path(job.output), job.task_ram, job.reserve)
    return _prepared[job.id]


def release_freed_memory() -> None:
    """Hand the memory a task freed back to the system: glibc keeps freed blocks of a task's buffers in its heap,
    where they would count against the next task of this long-lived process."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def worker_baseline() -> int:
    """The anonymous memory a worker process holds with the merge code loaded, before it merges anything."""
    import streammerge.engine  # noqa: F401 - loaded for the measurement, as run_group will

    return anon_rss()


def run_group(job: MergeJob, group: Group) -> GroupResult:
    """Merge the tensors of `group` into the output files; the entry point of every worker process."""
    from streammerge.engine import Engine

    started = time.perf_counter()
    # A task is given one core (a local worker slot, or Ray's num_cpus=1): more intra-op threads would only
    # compete with the other tasks.
    torch.set_num_threads(1)
    check_same_files(job, outputs=False)  # output files are renamed as they complete; each node checked them first
    prepared = _prepared_for(job)
    # Chunks sized for what this process holds now: a Ray worker's runtime grows between and during tasks.
    prepared.budget = prepared.budget.remeasured()
    by_name = {t.name: t for t in prepared.plan.tasks}
    tasks = [by_name[n] for n in group.names]
    engine = Engine(prepared, quiet=True, allow_nonfinite=job.allow_nonfinite)
    output = TaskOutput(job.placements, job.checksums)
    count = _Count()
    try:
        with MemoryGuard(prepared.budget.limit) as guard:
            skipped = engine.process(tasks, output, count, guard, group.reused.__contains__)
        if job.sync:
            output.finish()
    finally:
        output.close()
        release_freed_memory()
    written = [n for t in tasks for n in [t.name, *t.aliases] if n not in group.reused]
    checksums = {n: output.checksum(n) for n in written}  # also: every tensor was written whole
    return GroupResult(checksums if job.checksums else {}, list(engine.nonfinite), count.n - skipped,
                       guard.peak, time.perf_counter() - started, os.getpid(), node_name())
