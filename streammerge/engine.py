"""Runs a plan: for each tensor, stream its chunks through the method into a reused accumulator, write each
chunk at its place in the output, and release the input pages it read.

Peak memory is the accumulator plus one scratch buffer per input plus the output buffers, all sized from the
budget and allocated once per run; it does not depend on tensor size, model size or number of models.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from streammerge.config import DEFAULT_MAX_RAM, MergeConfig
from streammerge.cpu import merge_thread_policy
from streammerge.errors import OutputError, PlanError, StreamMergeError
from streammerge.hf.inputs import HFInputs, prepare_inputs
from streammerge.hf.model_files import model_files
from streammerge.interrupts import uninterruptible
from streammerge.io import Checkpoint, TensorInfo, open_checkpoint
from streammerge.io.output_safety import check_output_is_not_an_input, input_paths
from streammerge.io.output_spec import Output, OutputSpec, TensorSink, ResumeInputs, TorchContainer
from streammerge.io.outputs import check_disk_space, make_output, output_kind, output_spec
from streammerge.lora import apply_adapter
from streammerge.memory import CHUNK_ALIGN, Budget, MemoryGuard, bytes_per_element
from streammerge.methods.method import TILE, ChunkContext, Segment, tiles
from streammerge.plan import COPY, MERGE, Plan, TensorTask, build_plan


@dataclass
class Report:
    output: str
    files: list[str]
    tensors: int
    read_bytes: int
    written_bytes: int
    seconds: float
    peak_anon_bytes: int
    max_ram_bytes: int
    chunk_elements: int
    nonfinite_tensors: list[str] = field(default_factory=list)
    reused_files: list[str] = field(default_factory=list)  # complete shards kept from an interrupted run
    notes: list[str] = field(default_factory=list)
    # A distributed run (--workers, --ray): where its tasks ran, how many, and each task's budget and largest peak.
    executor: str = ""
    tasks: int = 0
    task_ram_bytes: int = 0
    task_peak_anon_bytes: int = 0

    @property
    def gb_per_s(self) -> float:
        return self.read_bytes / 1e9 / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "gb_per_s": round(self.gb_per_s, 3), "seconds": round(self.seconds, 3)}

    def summary(self) -> str:
        line = (f"merged {self.tensors} tensors -> {self.output}: read {self.read_bytes / 1e9:.2f} GB, wrote "
                f"{self.written_bytes / 1e9:.2f} GB in {self.seconds:.1f} s ({self.gb_per_s:.2f} GB/s), "
                f"peak anonymous RAM {self.peak_anon_bytes / 2**20:.0f} MiB "
                f"(budget {self.max_ram_bytes / 2**20:.0f} MiB)")
        if self.executor:
            line += (f"\n{self.tasks} task(s) on {self.executor}: largest task peak anonymous RAM "
                     f"{self.task_peak_anon_bytes / 2**20:.0f} MiB (each task's budget "
                     f"{self.task_ram_bytes / 2**20:.0f} MiB)")
        for note in self.notes:
            line += f"\nnote: {note}"
        if self.nonfinite_tensors:
            line += f"\nwarning: NaN/Inf in {len(self.nonfinite_tensors)} tensor(s): " + ", ".join(
                self.nonfinite_tensors[:10]) + (" ..." if len(self.nonfinite_tensors) > 10 else "")
        return line


@dataclass
class Prepared:
    """Everything known before any data is read: inputs, plan and budget."""

    config: MergeConfig
    output: Path
    checkpoints: list[Checkpoint]
    base: Checkpoint | None
    plan: Plan
    budget: Budget
    hf: HFInputs | None = None  # the inputs as Hugging Face models (config.json, tokenizer), when they are

    @property
    def inputs(self) -> list[Checkpoint]:
        """Every checkpoint read: the models, then the base if there is one."""
        return self.checkpoints + ([self.base] if self.base is not None else [])

    def close(self) -> None:
        for c in self.inputs:
            c.close()


def prepare(config: MergeConfig, output: Path | None = None, max_ram: int | None = None, reserve: int = 0) -> Prepared:
    """Open the inputs and plan the merge under `max_ram`, keeping `reserve` bytes of it free beyond the usual
    margin (for a process that also runs something else, such as a Ray worker's runtime)."""
    output = Path(output) if output is not None else config.output
    if output is None:
        raise OutputError("no output given: set `output:` in the config or pass --output PATH.")
    inputs: list[Checkpoint] = []  # the models, then the base: closed again if anything below fails
    requested = max_ram if max_ram is not None else config.max_ram  # bounds the parsing of headers, too
    try:
        for spec in config.models + ([config.base] if config.base is not None else []):
            inputs.append(open_checkpoint(spec.path, state_dict_key=spec.state_dict_key, max_ram=requested))
            if spec.lora is not None:
                apply_adapter(inputs[-1], spec.lora)
        checkpoints, base = inputs[:len(config.models)], (inputs[-1] if config.base is not None else None)
        hf = prepare_inputs(config, checkpoints, base)
        plan = build_plan(config, checkpoints, base)
        out_itemsize = max(t.out_dtype.itemsize for t in plan.tasks)
        unaligned = [i.itemsize for t in plan.tasks for i in t.inputs if not i.aligned]
        if config.method.load is not None:
            config.method.load()
        low_rank = any(s.lora is not None for s in config.models + ([config.base] if config.base else []))
        per_element = bytes_per_element(plan.max_inputs, config.dtype.itemsize, out_itemsize,
                                        config.method.buffers + low_rank,  # one scratch buffer for LoRA updates
                                        staging_itemsize=max(unaligned, default=0))
        largest = max(t.numel for t in plan.tasks)
        budget = Budget(requested, per_element, DEFAULT_MAX_RAM, largest_tensor=largest,
                        output_tensors=sum(1 + len(t.aliases) for t in plan.tasks), reserve=reserve,
                        statistics=statistics_bytes(config, plan))
    except BaseException:
        for c in inputs:
            c.close()
        raise
    return Prepared(config, output, checkpoints, base, plan, budget, hf)


def all_finite(t: torch.Tensor) -> bool:
    """Whether a chunk holds no NaN or Inf; true for integer and bool chunks. float8 chunks are checked on their
    bits (torch has no sum or isfinite for them on CPU): an all-ones exponent is Inf or NaN."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    bits = FLOAT8_NONFINITE.get(t.dtype)
    if bits is not None:
        mask, value = bits
        return not bool(((t.view(torch.uint8) & mask) == value).any())
    if math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())  # the sum can overflow; confirm element-wise


# float8 dtype -> (mask, value) of the bits of a non-finite element
FLOAT8_NONFINITE = {getattr(torch, name): bits for name, bits in (
    ("float8_e4m3fn", (0x7F, 0x7F)), ("float8_e5m2", (0x7C, 0x7C)),
    ("float8_e4m3fnuz", (0xFF, 0x80)), ("float8_e5m2fnuz", (0xFF, 0x80))) if hasattr(torch, name)}


# Tensors of at most this many elements are merged in runs when they lie back to back (`Engine.small_run`).
SMALL_TENSOR = CHUNK_ALIGN
SEGMENTS_PER_RUN = 256  # tensors in a run of a segmented method
# A tensor merged without statistics passes, or copied, streams in chunks of at most this many bytes per buffer
# whatever the budget: each chunk's result is then still in the CPU's cache when the writer copies it into the
# page cache (the budget's largest chunks, 16 Mi elements, made linear merges up to a quarter slower: README,
# "Memory model", "Chunk size").
STREAM_CHUNK_BYTES = 4 * 1024**2


class Workspace:
    """Buffers allocated once per run and reused for every chunk of every tensor. Accumulators and output
    buffers come in two slots: one is being written out while the other is filled."""

    def __init__(self, chunk: int, n_inputs: int, acc_dtype: torch.dtype, extra_buffers: int = 0):
        self.chunk = chunk
        self.acc_dtype = acc_dtype
        self.slot = 0
        self.accs = [torch.empty(chunk, dtype=acc_dtype) for _ in range(2)]
        self.scratch = [torch.empty(chunk, dtype=acc_dtype) for _ in range(n_inputs)]
        self.outs: dict[torch.dtype, list[torch.Tensor]] = {}
        self.staging: torch.Tensor | None = None
        # the method's own buffers, consecutive slices of one block (ChunkContext.arena)
        self.arena = torch.empty(chunk * extra_buffers, dtype=acc_dtype)
        self.extra = list(self.arena.split(chunk)) if extra_buffers else []
        self.low_rank: torch.Tensor | None = None  # for LoRA updates, allocated on first use
        self.views: dict = {}  # ChunkContext.views: what methods derive from `extra`

    def next_slot(self) -> None:
        self.slot ^= 1

    def acc(self, n: int) -> torch.Tensor:
        return self.accs[self.slot][:n]

    def out_buffer(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        if dtype not in self.outs:
            self.outs[dtype] = [torch.empty(self.chunk, dtype=dtype) for _ in range(2)]
        return self.outs[dtype][self.slot][:n]

    def staging_for(self, info: TensorInfo) -> torch.Tensor | None:
        """Reused memory for an unaligned input chunk (None when it can be viewed in place)."""
        if info.aligned:
            return None
        if self.staging is None or self.staging.numel() < self.chunk * info.itemsize:
            self.staging = torch.empty(self.chunk * info.itemsize, dtype=torch.uint8)
        return self.staging

    def read_as_acc(self, info: TensorInfo, start: int, stop: int, slot: int) -> torch.Tensor:
        """A chunk of `info` in accumulation dtype: the mapped view itself when it already is, else a copy
        in this input's scratch buffer."""
        scratch = self.scratch[slot][:stop - start]
        if info.dtype == self.acc_dtype and not info.aligned and info.stride is None:
            chunk = info.read(start, stop, staging=scratch.view(torch.uint8))
        else:
            chunk = info.read(start, stop, staging=self.staging_for(info))
            if chunk.dtype != self.acc_dtype or not chunk.is_contiguous() or info.delta is not None:
                chunk = scratch.copy_(chunk)  # never write into the mapping
        if info.delta is not None:
            info.delta.add_to(chunk, start, stop, self.delta_scratch())
        return chunk

    def delta_scratch(self) -> torch.Tensor:
        if self.low_rank is None:
            self.low_rank = torch.empty(self.chunk, dtype=self.acc_dtype)
        return self.low_rank

    def read_for_copy(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """A chunk copied unchanged to the output; unaligned bytes are staged in this slot's output buffer."""
        staging = None if info.aligned else self.out_buffer(info.dtype, stop - start).view(torch.uint8)
        return info.read(start, stop, staging=staging)


class BackgroundWriter:
    """Writes chunks on one background thread (pwrite releases the GIL) while the next chunk is merged.
    At most one job is pending; its errors surface on the next submit or drain. A job writing fewer than
    INLINE_BYTES runs in the caller's thread once the pending one is done: handing a small tensor to the thread
    costs more than writing it (two thread wake-ups against a pwrite of a few hundred bytes; with 50,000 tiny
    tensors the handoffs took about half the merge)."""

    INLINE_BYTES = 256 * 1024

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streammerge-writer")
        self.pending = None

    def submit(self, job, nbytes: int | None = None) -> None:
        self.drain()
        if nbytes is not None and nbytes < self.INLINE_BYTES:
            job()
        else:
            self.pending = self.pool.submit(job)

    def drain(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self.pool.shutdown(wait=True)

    def close_quietly(self) -> None:
        """On the error path: wait for the pending job, ignoring its outcome (the run is failing anyway)."""
        try:
            self.close()
        except Exception:
            pass


def _chunks(numel: int, chunk: int):
    for start in range(0, numel, chunk):
        yield start, min(numel, start + chunk)


def recipe_metadata(config: MergeConfig) -> dict[str, str]:
    """The safetensors `__metadata__` of a merge: `format: pt` and the recipe."""
    return {"format": "pt", "streammerge": json.dumps(config.recipe(), sort_keys=True)}


def build_output_spec(prepared: Prepared, metadata: dict[str, str] | None = None) -> OutputSpec:
    """What the output will hold and where each tensor's bytes go; `metadata` defaults to the recipe's."""
    config, plan = prepared.config, prepared.plan
    container = TorchContainer(
        key=next((c.container for c in prepared.checkpoints if c.container), ""),
        model_metadata=tuple(c.metadata or {} for c in prepared.checkpoints),
        model_weights=tuple(spec.params.get("weight") for spec in config.models),
        layout=config.pth_container)
    return output_spec(prepared.output, plan.entries, recipe_metadata(config) if metadata is None else metadata,
                       aliases={alias: task.name for task in plan.tasks for alias in task.aliases},
                       shard_size=config.shard_size, container=container,
                       resume=ResumeInputs(tuple(input_paths(prepared.inputs)), config.seed),
                       companions=model_files(prepared) if output_kind(prepared.output).sharded else None)


class Engine:
    """Runs a prepared merge into its output. `metadata` replaces the recipe as the safetensors
    `__metadata__` (convert keeps the source's)."""

    def __init__(self, prepared: Prepared, quiet: bool = False, allow_nonfinite: bool | None = None,
                 resume: bool = False, metadata: dict[str, str] | None = None, stats_in_memory: bool = True):
        self.prepared = prepared
        self.resume = resume
        self.config = prepared.config
        self.method = self.config.method
        self.chunk = prepared.budget.chunk_elements
        self.stream_chunk = min(self.chunk, max(CHUNK_ALIGN, STREAM_CHUNK_BYTES // self.config.dtype.itemsize))
        self.allow_nonfinite = (self.config.nan_policy == "allow") if allow_nonfinite is None else allow_nonfinite
        self.nonfinite: list[str] = []
        self.show_progress = not quiet and sys.stderr.isatty()
        self.metadata = metadata
        # A tensor that fits in one chunk gets its statistics from the chunk already read (the same computation
        # on the same values as the streamed passes, so the same result); False streams every pass (tests).
        self.stats_in_memory = stats_in_memory

    @functools.cached_property
    def spec(self) -> OutputSpec:
        return build_output_spec(self.prepared, self.metadata)

    # -- checks before any output exists ------------------------------------------------------------------
    def verify_non_float(self, tasks: list[TensorTask]) -> None:
        """Int and bool tensors are copied, so every model must hold the same values."""
        checkpoints = self.prepared.checkpoints
        for task in tasks:
            if not task.must_equal:
                continue
            first = task.sources[0]
            for start, stop in _chunks(task.numel, self.chunk):
                a = first.read(start, stop)
                for other in task.must_equal:
                    if not torch.equal(a, other.read(start, stop)):
                        model = next(i for i, c in enumerate(checkpoints) if other.file in c.files)
                        raise PlanError(
                            f"'{task.name}' is a {str(first.dtype).removeprefix('torch.')} tensor, which is never "
                            f"averaged, and its values differ between {checkpoints[0].path} and "
                            f"{checkpoints[model].path}. Add a rule such as "
                            f"{{match: \"{task.name}\", take: 0}} to choose which model's values to keep.")
                    other.release(start, stop)
                first.release(start, stop)

    # -- the run -------------------------------------------------------------------------------------------
    def run(self) -> Report:
        with merge_thread_policy(writer_core=self.method.elementwise, own_threads=self.method.own_threads):
            return self._run()

    def _run(self) -> Report:
        prepared = self.prepared
        plan, budget = prepared.plan, prepared.budget
        output: Output = make_output(self.spec, resume=self.resume)
        # Before anything is created or removed at the output:
        check_output_is_not_an_input(output.files, prepared.output, prepared.inputs, also=(self.config.source,))
        started = time.perf_counter()
        with MemoryGuard(budget.limit) as guard:
            self.verify_non_float(plan.tasks)
            progress = tqdm(total=plan.read_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                            desc="merging", disable=not self.show_progress, dynamic_ncols=True)
            try:
                output.open()  # removes an interrupted run's debris, or verifies what it completed (resume)
                check_disk_space(prepared.output, output.space_needed)
                skipped_bytes = self.process(plan.tasks, output, progress, guard, output.reused)
                output.commit()
            except BaseException:
                with uninterruptible():  # a second Ctrl-C must not cut the cleanup short
                    output.abort()
                raise
            finally:
                progress.close()
        return Report(
            output=str(prepared.output), files=[str(f) for f in output.files],
            tensors=len(plan.entries), read_bytes=plan.read_bytes - skipped_bytes,
            written_bytes=output.total_size,
            seconds=time.perf_counter() - started, peak_anon_bytes=guard.peak, max_ram_bytes=budget.limit,
            chunk_elements=self.chunk, nonfinite_tensors=list(self.nonfinite),
            reused_files=list(output.reused_files), notes=list(output.notes))

    def process(self, tasks: list[TensorTask], output: TensorSink, progress, guard: MemoryGuard,
                reused: Callable[[str], bool]) -> int:
        """Merge `tasks` into `output`; tensors for which `reused(name)` holds are already there (--resume).
        Returns the input bytes skipped. Also what each task of a distributed merge runs."""
        workspace = Workspace(self.chunk, self.prepared.plan.max_inputs, self.config.dtype, self.method.buffers)
        self.writer = BackgroundWriter()
        # Leave the page cache as we found it: an input tensor that was wholly cached stays cached; the pages of
        # one the merge had to read from disk are dropped again after use. Decided for every tensor before
        # anything is read: the kernel's readahead for one tensor brings in the next ones.
        self.cached_before = {id(task): [info.is_cached(0, info.numel) for info in task.inputs]
                              for task in tasks if not reused(task.name)}
        skipped_bytes = 0
        try:
            index = 0
            while index < len(tasks):
                task = tasks[index]
                if reused(task.name):
                    progress.update(task.read_bytes)
                    skipped_bytes += task.read_bytes
                    index += 1
                    continue
                run = self.small_run(tasks, index, reused)
                index += len(run)
                if len(run) > 1:
                    self.run_small(run, workspace, output, progress, guard)
                    continue
                self.run_task(task, workspace, output, progress, guard)
                aliases = [a for a in task.aliases if not reused(a)]
                if aliases:
                    self.writer.drain()
                    for alias in aliases:
                        output.copy(task.name, alias, self.chunk * task.out_dtype.itemsize)
            self.writer.close()
        except BaseException:
            with uninterruptible():
                self.writer.close_quietly()
            raise
        return skipped_bytes

    # -- runs of small tensors: per-tensor work (a read, a merge, a check, a release per input) costs far more
    # than the math for tensors of a few hundred elements, so tensors that lie back to back in every input are
    # merged together as one chunk. An element-wise method gives every element the same result that way; a
    # segmented one does its per-tensor work on each tensor's segment of the run (`Method.segmented`).
    def _small(self, task: TensorTask) -> bool:
        method = self.method
        return (task.kind == MERGE and not task.aliases
                and 0 < task.numel <= SMALL_TENSOR and task.numel <= self._run_limit
                and all(i.stride is None and i.delta is None and i.aligned for i in task.inputs)
                and ((method.elementwise and not statistics_passes(self.config, task))
                     or (method.segmented and self.stats_in_memory)))

    @property
    def _run_limit(self) -> int:
        """Elements in a run: a streamed chunk, or for a segmented method a cache-sized tile (its run is not
        tiled)."""
        return min(self.chunk, TILE) if self.method.segmented else self.stream_chunk

    def small_run(self, tasks: list[TensorTask], index: int, reused: Callable[[str], bool]) -> list[TensorTask]:
        """The tasks from `index` on that can be merged as one chunk (just tasks[index] when none follows)."""
        first = tasks[index]
        if not self._small(first):
            return [first]
        run, total, limit = [first], first.numel, self._run_limit
        # tasks after the first; a segmented run holds records per tensor (segments, statistics, contexts)
        following = SEGMENTS_PER_RUN - 1 if self.method.segmented else limit // first.numel
        for task in tasks[index + 1:index + 1 + following]:
            if (total + task.numel > limit or reused(task.name) or not self._small(task)
                    or not _follows(run[-1], task)):
                break
            run.append(task)
            total += task.numel
        return run

    def run_small(self, run: list[TensorTask], ws: Workspace, output, progress, guard: MemoryGuard) -> None:
        first, total = run[0], sum(t.numel for t in run)
        spans = [TensorInfo(info.name, (total,), info.dtype, info.file, info.offset) for info in first.inputs]
        was_cached = [all(cached) for cached in zip(*(self.cached_before[id(task)] for task in run))]
        sources = len(first.sources)
        whole = TensorTask(first.name, (total,), first.out_dtype, MERGE, spans[:sources], first.rule,
                           first.model_params, first.params, base=spans[sources] if first.base is not None else None)
        ws.next_slot()
        ctx = self._context(whole, ws, 0, total)
        stats = None
        if self.method.segmented:
            start = 0
            for task in run:
                ctx.segments.append(Segment(start, task.name, task.shape))
                start += task.numel
            passes = [statistics_passes(self.config, task) for task in run]
            if not any(passes):
                stats = [None] * len(run)
            elif self.method.segment_stats is not None:
                stats = self.method.segment_stats(ctx)
            if stats is None:  # each segment's own passes, as for the tensor alone
                stats = [self._statistics_in_memory(ctx.segment(segment), n)
                         for segment, n in zip(ctx.segments, passes)]
        result = self.method.merge(ctx, stats)
        if result.dtype != first.out_dtype:
            result = ws.out_buffer(first.out_dtype, total).copy_(result)
        if not all_finite(result):  # find the tensors that hold them, for the message or the summary
            start = 0
            for task in run:
                if not all_finite(result[start:start + task.numel]):
                    self._nonfinite(task, task.inputs, 0, task.numel)
                start += task.numel
        self.writer.submit(functools.partial(_write_run_and_release, output, run, result, spans, was_cached),
                           result.numel() * result.element_size())
        progress.update(sum(i.itemsize for i in spans) * total)
        guard.check(f"'{first.name}' and the {len(run) - 1} small tensor(s) after it")

    def run_task(self, task: TensorTask, ws: Workspace, output, progress, guard: MemoryGuard) -> None:
        inputs = task.inputs
        was_cached = self.cached_before[id(task)]
        if task.kind == COPY:
            source = task.sources[0]
            read = ((lambda s, e: ws.read_as_acc(source, s, e, 0)) if source.delta is not None
                    else (lambda s, e: ws.read_for_copy(source, s, e)))
            self._stream(task, inputs, ws, output, progress, guard, read, was_cached, passes=0)
            return
        stats = None
        passes = statistics_passes(self.config, task)
        if passes and self.stats_in_memory and task.numel <= self.chunk:
            self._stream(task, inputs, ws, output, progress, guard,
                         lambda s, e: self._observe_and_merge(self._context(task, ws, s, e), passes), was_cached,
                         passes)
            return
        if passes:
            stats = self.method.init_stats(task.numel, len(task.sources))
            pass_index = 0
            while pass_index < passes:
                for start, stop in _chunks(task.numel, self._chunk_for(task, passes)):
                    self._observe(stats, pass_index, self._context(task, ws, start, stop))
                    for info in inputs:  # keep the page cache: the next pass reads these bytes again
                        info.release(start, stop, drop_cache=False)
                    guard.check(f"'{task.name}'")
                pass_index = self._finish_pass(stats, pass_index)
        self._stream(task, inputs, ws, output, progress, guard,
                     lambda s, e: self._merge(self._context(task, ws, s, e), stats), was_cached, passes)

    def _chunk_for(self, task: TensorTask, passes: int) -> int:
        """The chunk of a tensor: the budget's for one with statistics passes (held whole where it fits), else the
        streamed chunk; for a merged tensor larger than that, the largest multiple of the method's quantum for its
        shape within it (at least one quantum)."""
        limit = self.chunk if passes else self.stream_chunk
        quantum = self.method.chunk_quantum(task.shape) if self.method.chunk_quantum else None
        if quantum is None or task.kind != MERGE or task.numel <= limit:
            return limit
        if quantum > self.chunk:
            raise ValueError(f"'{task.name}': {self.method.name} streams it in chunks of {quantum} elements, more "
                             f"than the chunk of {self.chunk}")
        return max(1, limit // quantum) * quantum

    def _observe_and_merge(self, ctx: ChunkContext, passes: int) -> torch.Tensor:
        """Every statistics pass, then the merge, on one chunk holding the whole tensor: one read."""
        return self._merge(ctx, self._statistics_in_memory(ctx, passes))

    def _statistics_in_memory(self, ctx: ChunkContext, passes: int):
        """The statistics of a whole tensor held in `ctx` (None without passes). The passes see the chunk
        untiled, so a method may compute its statistics on the whole tensor at once."""
        if not passes:
            return None
        stats = self.method.init_stats(ctx.numel, len(ctx.inputs))
        pass_index = 0
        while pass_index < passes:
            self.method.observe(stats, pass_index, ctx)
            pass_index = self._finish_pass(stats, pass_index)
        return stats

    def _finish_pass(self, stats, pass_index: int) -> int:
        """The method's end of a statistics pass; the index of the next pass to run (it may skip passes or go back)."""
        following = self.method.finish_pass(stats, pass_index) if self.method.finish_pass else None
        return pass_index + 1 if following is None else following

    def _parts(self, ctx: ChunkContext) -> list[ChunkContext]:
        return tiles(ctx) if self.method.tiled else [ctx]

    def _observe(self, stats, pass_index: int, ctx: ChunkContext) -> None:
        for part in self._parts(ctx):
            self.method.observe(stats, pass_index, part)

    def _merge(self, ctx: ChunkContext, stats) -> torch.Tensor:
        """The method's merge of a chunk, a tile at a time where it allows (same result, faster math)."""
        parts = self._parts(ctx)
        if len(parts) == 1:
            return self.method.merge(ctx, stats)
        for part in parts:
            result = self.method.merge(part, stats)
            if result.data_ptr() != part.out.data_ptr():
                part.out.copy_(result)
        return ctx.out

    def _stream(self, task, inputs: list[TensorInfo], ws, output, progress, guard, produce, was_cached,
                passes: int) -> None:
        # No read-ahead hints of our own: the kernel's readahead of each mapping follows these front-to-back reads,
        # and MADV_WILLNEED on the next chunk made cold merges slower (README, "Memory model").
        for start, stop in _chunks(task.numel, self._chunk_for(task, passes)):
            ws.next_slot()
            result = produce(start, stop)
            if result.dtype != task.out_dtype:
                result = ws.out_buffer(task.out_dtype, stop - start).copy_(result)
            if not all_finite(result):  # what is written: a cast to out_dtype can overflow to Inf
                self._nonfinite(task, inputs, start, stop)
            self.writer.submit(functools.partial(_write_and_release, output, task.name, start, stop, result,
                                                 inputs, was_cached), result.numel() * result.element_size())
            progress.update(sum(i.itemsize for i in inputs) * (stop - start))
            guard.check(f"'{task.name}'")

    def _nonfinite(self, task: TensorTask, inputs: list[TensorInfo], start: int, stop: int) -> None:
        if self.allow_nonfinite:
            if task.name not in self.nonfinite:
                self.nonfinite.append(task.name)
            return
        culprits = [str(info.file.path) for info in inputs if not all_finite(info.read(start, stop))]
        out_dtype = str(task.out_dtype).removeprefix("torch.")
        where = (f"the input(s) {', '.join(culprits)} hold NaN/Inf there" if culprits else
                 f"the inputs are finite, so the merge overflowed or its values do not fit the output dtype "
                 f"{out_dtype} (largest finite value {torch.finfo(task.out_dtype).max:g}); try another out_dtype, "
                 "dtype: float64 or other weights")
        raise StreamMergeError(
            f"the merged tensor '{task.name}' has NaN or Inf values: {where}. Stopped without writing the "
            "output; rerun with --allow-nonfinite to write it anyway and list such tensors in the summary.")

    def _context(self, task: TensorTask, ws: Workspace, start: int, stop: int) -> ChunkContext:
        inputs = [ws.read_as_acc(info, start, stop, i) for i, info in enumerate(task.sources)]
        base = ws.read_as_acc(task.base, start, stop, len(task.sources)) if task.base is not None else None
        acc_dtype = self.config.dtype

        def with_delta(info: TensorInfo, a: int, b: int) -> torch.Tensor:
            chunk = info.read(a, b).to(acc_dtype, copy=True)
            if info.delta is not None:
                info.delta.add_to(chunk, a, b, ws.delta_scratch())
            return chunk

        def read_input(index: int, a: int, b: int) -> torch.Tensor:
            return with_delta(task.sources[index], a, b)

        def read_base(a: int, b: int) -> torch.Tensor:
            return with_delta(task.base, a, b)

        return ChunkContext(task.name, start, task.numel, inputs, base, task.model_params, task.params,
                            ws.acc(stop - start), self.config.seed, task.shape, ws.extra, read_input,
                            read_base if task.base is not None else None, ws.views, ws.arena)


def statistics_bytes(config: MergeConfig, plan: Plan) -> int:
    """The most that one tensor's statistics hold while it is merged (`Method.stats_bytes`), or a run of small
    tensors' together (a run holds at most a tile of elements: bounded by the largest share per element)."""
    stats_bytes = config.method.stats_bytes
    if stats_bytes is None:
        return 0
    largest, per_element = 0, 0.0
    for task in plan.tasks:
        if task.kind != MERGE:
            continue
        held = stats_bytes(task.params, task.model_params, config.dtype, task.numel, task.shape)
        largest = max(largest, held)
        if task.numel <= SMALL_TENSOR:
            per_element = max(per_element, held / task.numel)
    return max(largest, math.ceil(per_element * TILE))


def statistics_passes(config: MergeConfig, task: TensorTask) -> int:
    """How many statistics passes the method makes over `task`'s inputs before it merges them."""
    if task.kind == COPY:
        return 0
    return config.method.passes_for(task.params, task.model_params, config.dtype, task.numel, task.shape)


def input_reads(config: MergeConfig, task: TensorTask, chunk: int) -> int:
    """How many times merging `task` with chunks of `chunk` elements reads its inputs: once, plus once per
    statistics pass when the tensor is larger than a chunk (a smaller one gets its statistics from the chunk
    already read; see Engine.run_task)."""
    if task.numel <= chunk or task.kind == COPY:
        return 1
    method = config.method
    if method.streamed_reads is not None:
        return method.streamed_reads(task.params, task.model_params, config.dtype, task.numel, task.shape, chunk)
    return statistics_passes(config, task) + 1


def _follows(previous: TensorTask, task: TensorTask) -> bool:
    """Whether `task` can join a run of small tensors ending with `previous`: its bytes come right after
    previous's in every input, with the same dtypes, parameters and output dtype."""
    if (task.out_dtype != previous.out_dtype or (task.base is None) != (previous.base is None)
            or len(task.sources) != len(previous.sources) or task.params != previous.params
            or task.model_params != previous.model_params):
        return False
    return all(b.file is a.file and b.dtype == a.dtype and b.offset == a.offset + a.nbytes
               for a, b in zip(previous.inputs, task.inputs))


def _write_run_and_release(output, run: list[TensorTask], result: torch.Tensor, spans: list[TensorInfo],
                           was_cached) -> None:
    write_run = getattr(output, "write_run", None)  # outputs that can write such a run at once say so
    if write_run is not None:
        write_run([task.name for task in run], result)
    else:
        start = 0
        for task in run:
            output.write(task.name, 0, result[start:start + task.numel])
            start += task.numel
    for info, cached in zip(spans, was_cached):
        info.release(0, result.numel(), drop_cache=not cached)


def _write_and_release(output, name: str, start: int, stop: int, chunk: torch.Tensor, inputs, was_cached) -> None:
    output.write(name, start, chunk)
    for info, cached in zip(inputs, was_cached):
        info.release(start, stop, drop_cache=not cached)


def merge(config: MergeConfig, output: Path | None = None, max_ram: int | None = None, quiet: bool = False,
          allow_nonfinite: bool | None = None, resume: bool = False) -> Report:
    prepared = prepare(config, output, max_ram)
    try:
        return Engine(prepared, quiet=quiet, allow_nonfinite=allow_nonfinite, resume=resume).run()
    finally:
        prepared.close()


def describe_plan(prepared: Prepared) -> str:
    """The --dry-run view: tensors per rule, output size, shards, estimated peak RAM."""
    plan, budget, config = prepared.plan, prepared.budget, prepared.config
    lines = [f"method: {config.method.name} over {len(prepared.checkpoints)} model(s)"
             + (f", base {config.base.path}" if config.base else "")]
    for i, (spec, c) in enumerate(zip(config.models, prepared.checkpoints)):
        params = "" if config.slices else ", ".join(f"{k}={v}" for k, v in spec.params.items())  # slices: per source
        lines.append(f"  models[{i}]: {c.path} ({c.format}{', ' + c.container if c.container else ''}, "
                     f"{len(c.tensors)} tensors, {c.total_bytes / 1e9:.2f} GB){' ' + params if params else ''}")
    for i, piece in enumerate(config.slices or []):
        sources = ", ".join(f"models[{s.model}] layers {s.layers[0]}..{s.layers[1] - 1}" for s in piece.sources)
        lines.append(f"  slices[{i}]: {piece.length} layer(s) from {sources}"
                     + (f" (base layers {piece.base_layers[0]}..{piece.base_layers[1] - 1})"
                        if piece.base_layers and config.method.uses_base else ""))
    updates = {**(prepared.hf.config_updates if prepared.hf is not None else {}), **plan.config_updates}
    if updates:
        lines.append("config.json: " + ", ".join(f"{k} = {v}" for k, v in updates.items()))
    lines.append("tensors per rule (first match wins):")
    counts = plan.tensors_per_rule()
    for label in [r.label for r in config.rules] + ["default"]:
        note = "   <- matches no tensor: check the pattern" if label != "default" and not counts[label] else ""
        lines.append(f"  {counts[label]:6d}  {label}{note}")
    tied = sum(len(t.aliases) for t in plan.tasks)
    if tied:
        lines.append(f"tied tensors computed once: {tied}")
    spec = build_output_spec(prepared)
    lines.append(f"output: {prepared.output} ({spec.kind}), {len(plan.entries)} tensors, "
                 f"{plan.output_bytes / 1e9:.2f} GB")
    if output_kind(prepared.output).sharded:
        lines.append(f"shards: {len(spec.files)} of at most {config.shard_size / 1e9:.2f} GB")
        lines.extend(describe_directory_files(spec))
    lines.append(f"reads: {plan.read_bytes / 1e9:.2f} GB{_statistics_rereads(config, plan, budget.chunk_elements)}; "
                 f"chunk: {budget.chunk_elements} elements "
                 f"({math.ceil(budget.chunk_elements * budget.per_element / 2**20)} MiB of buffers)")
    lines.append(f"estimated peak anonymous RAM: {budget.estimated_peak / 2**20:.0f} MiB "
                 f"(budget {budget.limit / 2**20:.0f} MiB)")
    return "\n".join(lines)


def _statistics_rereads(config: MergeConfig, plan, chunk: int) -> str:
    """What the statistics passes of the tensors larger than a chunk read again (from the page cache where it holds
    them), for `describe_plan`: empty when none does."""
    again = [(task, input_reads(config, task, chunk) - 1) for task in plan.tasks]
    again = [(task, reads) for task, reads in again if reads > 0]
    if not again:
        return ""
    extra = sum(task.read_bytes * reads for task, reads in again)
    return (f" once, {(plan.read_bytes + extra) / 1e9:.2f} GB with the statistics passes over the {len(again)} "
            f"tensor(s) larger than a chunk")


def describe_directory_files(spec: OutputSpec) -> list[str]:
    """What a directory output will write beside its tensors, and the other model's weight files it removes."""
    from streammerge.io.sharded_output import stale_weight_files, weight_file_names

    directory = Path(spec.path)
    weights = weight_file_names(spec)

    def listed(names) -> str:
        return ", ".join(n + (" (replaces the one there)" if (directory / n).exists() else "") for n in names)

    lines = [f"weight files: {listed(weights)}"]
    lines.append(f"model files: {listed(spec.companions)}" if spec.companions
                 else "model files: none (the inputs are not Hugging Face model directories)")
    stale = stale_weight_files(directory, set(weights) | set(spec.companions))
    if stale:
        lines.append(f"removed at commit (weight files of another model, which would be loaded instead): "
                     f"{', '.join(p.name for p in stale)}")
    return lines
