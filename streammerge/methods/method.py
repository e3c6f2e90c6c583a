"""What a merge method is: its parameters (`Param`), what it sees of a tensor (`ChunkContext`) and what it
declares to the engine (`Method`).

A method is a small function over one chunk of one tensor. It declares its parameters once (`Param`), which
drives config validation, rule overrides and `--help`. Methods that need whole-tensor statistics declare
`stat_passes`: the engine streams every chunk through `observe` that many times before calling `merge`, so a
tensor far larger than the RAM budget is merged exactly as if it fit.

Chunks start on a grid of `GRID` elements (the engine's chunk size is a multiple of it) and `merge` sees the
chunks of a tensor in ascending order; methods whose statistics or random draws are computed per grid block
therefore give bit-identical results whatever the chunk size is.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from streammerge.errors import ConfigError, short
from streammerge.memory import CHUNK_ALIGN

GRID = CHUNK_ALIGN  # elements per block of the fixed grid for statistics and random draws


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    help: str
    per_model: bool = False  # set per model (models[i].weight) rather than once for the method
    kind: type = float
    check: Callable[[Any], str | None] | None = None  # returns why a value is not allowed, or None


@dataclass
class ChunkContext:
    """One chunk of one tensor, as the method sees it. Inputs are read-only (they may be mapped file pages)."""

    name: str  # output tensor name
    offset: int  # element offset of this chunk in the flattened tensor
    numel: int  # elements in the whole tensor
    inputs: list[torch.Tensor]  # one per model, accumulation dtype
    base: torch.Tensor | None  # base model chunk for task-vector methods
    model_params: list[dict]  # per-model parameters (weight, density, ...)
    params: dict  # method parameters (normalize, t, ...)
    out: torch.Tensor  # preallocated accumulator (accumulation dtype) to fill and return
    seed: int = 0
    shape: tuple = ()  # shape of the whole tensor
    buffers: list[torch.Tensor] = field(default_factory=list)  # the method's `Method.buffers` chunk-sized
    # accumulation-dtype buffers, reused from chunk to chunk (full length: slice them to the chunk)
    # Copies, in accumulation dtype, of elements [start, stop) anywhere in the tensor, for methods whose unit of
    # work (a row) may straddle chunks: read_input(model index, start, stop) and read_base(start, stop).
    read_input: Callable[[int, int, int], torch.Tensor] | None = None
    read_base: Callable[[int, int], torch.Tensor] | None = None
    # Views of `buffers` a method derives, kept for the run (the buffers are the same for every chunk): `derived`
    views: dict = field(default_factory=dict)
    # All of `buffers` as one block (they are its consecutive slices, in order): room for a statistic of a whole
    # tensor larger than a chunk, for as long as the method's buffers are not in use otherwise
    arena: torch.Tensor | None = None
    # For a run of whole small tensors merged as one chunk (`Method.segmented`): where each tensor lies in it
    segments: list["Segment"] = field(default_factory=list)
    segment_contexts: dict = field(default_factory=dict)  # `segment`'s, made once per segment

    def segment(self, segment: "Segment") -> "ChunkContext":
        """The context of a tensor of this run as if it were merged alone. Its buffers are the run's from the
        tensor's start on, so the views a method makes of them lie at the tensor's place."""
        context = self.segment_contexts.get(segment.start)
        if context is None:
            a, z = segment.start, segment.stop
            context = self.segment_contexts[a] = ChunkContext(
                segment.name, 0, segment.numel, [x[a:z] for x in self.inputs],
                None if self.base is None else self.base[a:z], self.model_params, self.params, self.out[a:z],
                self.seed, segment.shape, [b[a:] for b in self.buffers])
        return context

    def gather_room(self) -> int:
        """Elements of `arena` a statistics pass may gather a whole tensor's values in: all of them for a tensor
        streamed in chunks, none for one held whole (its chunk is the tensor, nothing to gather) or without buffers."""
        if self.arena is None or self.out.numel() >= self.numel:
            return 0
        return self.arena.numel()

    def buffers_from(self, k: int) -> torch.Tensor:
        """The method's buffers from the k-th on, as one block of `arena` (scratch for what is free there)."""
        return self.arena[k * self.buffers[0].numel():]

    def derived(self, make: Callable[["ChunkContext"], Any]) -> Any:
        """make(self), a method's named views of its buffers for a chunk of this length, made once per run and
        length: views cost a few microseconds each, which adds up over thousands of small tensors."""
        key = (make, self.out.numel())
        value = self.views.get(key)
        if value is None:
            value = self.views[key] = make(self)
        return value


@dataclass(frozen=True)
class Segment:
    """A whole tensor within a run of small tensors merged as one chunk: elements [start, start + numel)."""

    start: int
    name: str
    shape: tuple

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stop(self) -> int:
        return self.start + self.numel


def kernel_loader(*names: str) -> Callable[[], None]:
    """`Method.load` for a method whose math runs on the compiled kernels `streammerge.kernels.<name>`: imported
    (numba with them) only when such a merge runs, not by every command."""
    def load() -> None:
        for name in names:
            importlib.import_module(f"streammerge.kernels.{name}").load()

    return load


def kernel_loaded(name: str) -> bool:
    """Whether `streammerge.kernels.<name>` is loaded (by `Method.load`): a pass that has a compiled form and a
    numpy one takes the compiled one only then, never importing numba in mid-merge."""
    return f"streammerge.kernels.{name}" in sys.modules


def per_segment(merge: Callable[[ChunkContext, Any], torch.Tensor]) -> Callable[[ChunkContext, Any], torch.Tensor]:
    """A method's merge that makes it `Method.segmented` by merging each tensor of a run on the tensor's own
    context (`ChunkContext.segment`), with its own statistics: the same work as for the tensor alone, less the
    engine's per tensor (reads, checks, writes). For methods whose per-tensor work is not worth vectorising."""
    def merge_segments(ctx: ChunkContext, stats) -> torch.Tensor:
        if not ctx.segments:
            return merge(ctx, stats)
        for segment, segment_stats in zip(ctx.segments, stats):
            part = ctx.segment(segment)
            result = merge(part, segment_stats)
            if result.data_ptr() != part.out.data_ptr():
                part.out.copy_(result)
        return ctx.out

    return merge_segments


TILE = 4 * GRID  # elements: 1 MiB per float32 buffer, so the few an operation touches stay in the CPU's caches


def tiles(ctx: ChunkContext, size: int = TILE) -> list[ChunkContext]:
    """The chunk of `ctx` as consecutive slices of `size` elements (a multiple of GRID), each a context of its
    own: inputs, base and output sliced; the method's buffers are reused from their start for every slice."""
    n = ctx.out.numel()
    if n <= size:
        return [ctx]
    return [dataclasses.replace(ctx, offset=ctx.offset + a, inputs=[x[a:a + size] for x in ctx.inputs],
                                base=None if ctx.base is None else ctx.base[a:a + size], out=ctx.out[a:a + size])
            for a in range(0, n, size)]


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    merge: Callable[[ChunkContext, Any], torch.Tensor]
    params: tuple[Param, ...] = ()
    needs_base: bool = False
    accepts_base: bool = False  # a base is optional (used when the config gives one)
    # Whole-tensor statistic passes before the merge pass: a number, or a function of
    # (method params, per-model params, accumulation dtype, numel, shape) when it depends on them.
    stat_passes: int | Callable[[dict, list[dict], torch.dtype, int, tuple], int] = 0
    init_stats: Callable[[int, int], Any] | None = None  # (numel, n_models) -> state
    observe: Callable[[Any, int, ChunkContext], None] | None = None  # (state, pass index, chunk)
    # (state, pass index) -> None, or the index of the next pass to run when the passes in between have nothing
    # left to do (a selection completed early): the engine then skips their reads; or an earlier one, to go over
    # passes again (a bracketing pass that missed, followed by the histogram passes)
    finish_pass: Callable[[Any, int], int | None] | None = None
    # (method params, per-model params, accumulation dtype, numel, shape, chunk) -> how many times merging a tensor
    # larger than the chunk reads its inputs, for a method whose `finish_pass` skips passes (as they usually go: a
    # selection that brackets its ranks reads more where a range misses); else one per pass plus one
    streamed_reads: Callable[[dict, list[dict], torch.dtype, int, tuple, int], int] | None = None
    buffers: int = 0  # chunk-sized accumulation-dtype buffers the method needs beyond the accumulator
    # (method params, per-model params, accumulation dtype, numel, shape) -> the most bytes a tensor's statistics
    # hold beyond the buffers (per-row or per-column sums and what is made of them): the budget reserves the
    # largest, so that chunks shrink to leave room for them
    stats_bytes: Callable[[dict, list[dict], torch.dtype, int, tuple], int] | None = None
    min_models: int = 1
    max_models: int | None = None
    # (method params, per-model params) of one tensor -> why they cannot be used together, or None
    check: Callable[[dict, list[dict]], str | None] | None = None
    # Each output element is a function of the same element of the inputs and of the parameters alone (not of
    # its position, the tensor's name or shape): the engine may then merge a run of small tensors that lie
    # back to back in every input as one chunk, with the same result as one tensor at a time.
    elementwise: bool = False
    # Merging (and observing) a chunk gives the same result as doing so for its consecutive slices in order, each
    # a multiple of GRID elements long, as with a smaller chunk, but without reading anything again: the engine
    # then runs the math a cache-sized tile at a time (an element-wise operation on a chunk far larger than the
    # CPU's caches runs at the speed of memory, several times slower). The statistics passes over a chunk holding
    # the whole tensor stay untiled, so that a method may select on the whole tensor at once.
    tiled: bool = False
    # Merging a run of whole small tensors as one chunk, with `ChunkContext.segments` set and one statistics state
    # per tensor (made by the passes over the tensor's own context), gives each tensor's result as if merged
    # alone: the method does its per-tensor work (selections, random draws) on each segment and the element-wise
    # rest on the whole run at once, or merges each segment on its own context (`per_segment`). Small tensors then
    # cost a few operations each instead of a whole merge.
    segmented: bool = False
    # For a segmented method with statistics passes: (the run's context, segments set) -> the statistics of every
    # segment at once (cheaper than each segment's own passes), or None to have each segment make its passes
    segment_stats: Callable[[ChunkContext], list | None] | None = None
    # (shape) -> elements, a multiple of GRID and at most the smallest chunk (MIN_CHUNK_ELEMENTS), that every chunk
    # of a streamed tensor of that shape is a multiple of (a method whose chunks must hold whole rows), or None
    chunk_quantum: Callable[[tuple], int | None] | None = None
    # Loads what the method's math runs on beyond torch and numpy (compiled kernels), before the merge measures what
    # the process holds, so that its budget counts it.
    load: Callable[[], None] | None = None
    # The math runs on the merge's own threads (`streaming.in_parallel`: compiled kernels, numpy sorts), with few
    # torch operations between: torch is held to one thread during the merge (`cpu.merge_thread_policy`), so that
    # its idle OpenMP threads do not spin on the cores the merge's threads need. Methods whose torch operations
    # are a large part of their work lose more by it than they gain (measured per method).
    own_threads: bool = False
    in_mergekit: bool = True  # mergekit has a method of this name and meaning (its configs may ask for it)
    # A typical use, for benchmarks: {"model": {per-model params}, "parameters": {method params}}
    typical: dict = field(default_factory=dict)

    def passes_for(self, params: dict, model_params: list[dict], dtype: torch.dtype, numel: int,
                   shape: tuple = ()) -> int:
        if callable(self.stat_passes):
            return self.stat_passes(params, model_params, dtype, numel, shape or (numel,))
        return self.stat_passes

    @property
    def uses_base(self) -> bool:
        return self.needs_base or self.accepts_base

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def method_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)

    @property
    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)


def coerce_param(param: Param, value, where: str):
    """Check a parameter value against its declaration (numbers must be finite)."""
    if param.kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{param.name}' must be true or false, got {short(value)}.")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: '{param.name}' must be a number, got {short(value)}.")
    else:
        try:
            finite = math.isfinite(value)
            value = param.kind(value) if finite else value
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite:
            raise ConfigError(f"{where}: '{param.name}' must be a finite number, got {short(value)}.")
    problem = param.check(value) if param.check is not None else None
    if problem:
        raise ConfigError(f"{where}: '{param.name}' = {short(value)}: {problem}.")
    return value
