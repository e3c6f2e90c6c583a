"""Layer slices (mergekit's `slices`): which input tensors each output tensor is made from.

An output model is a stack of slices. Each slice takes the same number of consecutive layers from each of its
sources (merged with the config's method, or copied when it has one source); output layers are numbered in
stacking order. Tensors outside the layers are taken as mergekit takes them: those before the layers (the
embeddings) from the first slice's sources, the others (final norm, head) from the last slice's sources.
Computed from tensor names alone, so the mergekit translation and the plan share it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from streammerge.errors import PlanError
from streammerge.layers import split_layer_name

# Tensors before the stack of layers (mergekit's "pre weights"); every other non-layer tensor comes after it.
PRE_LAYER_PATTERN = re.compile(r"(?:^|\.)(?:embed_tokens|embed_in|wte|wpe|word_embeddings|tok_embeddings|"
                               r"embed_positions|embeddings)\.")


@dataclass(frozen=True)
class SliceSource:
    model: int  # index into the config's models
    layers: tuple[int, int]  # [start, stop) of that model's layers
    params: dict  # per-model parameters of this source (defaults filled in)


@dataclass(frozen=True)
class Slice:
    sources: tuple[SliceSource, ...]
    base_layers: tuple[int, int] | None = None  # the base model's layers this slice's task vectors refer to

    @property
    def length(self) -> int:
        start, stop = self.sources[0].layers
        return stop - start


@dataclass(frozen=True)
class Placement:
    """One output tensor of a sliced model and the input tensors it is made from."""

    name: str
    slice_index: int
    t: float  # mergekit's gradient position: layer index within the slice / (slice length - 1); 0 outside layers
    inputs: tuple[str, ...]  # input tensor name, one per source of the slice
    base_input: str | None  # the base model's tensor name for it (task-vector methods)


def layer_count(names) -> int:
    return max((s[1] + 1 for n in names if (s := split_layer_name(n))), default=0)


def place(slices: list[Slice], names_of: Callable[[int], list[str]],
          describe: Callable[[int], str] = str) -> list[Placement]:
    """Every output tensor in output order: tensors before the layers, the slices' layers renumbered, the rest.
    `names_of(model)` lists a model's tensor names."""
    first_names = names_of(slices[0].sources[0].model)
    last_names = names_of(slices[-1].sources[0].model)
    placements = []
    n_first = len(slices[0].sources)
    for name in first_names:
        if split_layer_name(name) is None and PRE_LAYER_PATTERN.search(name):
            placements.append(Placement(name, 0, 0.0, (name,) * n_first, name))
    out_layer = 0
    for index, piece in enumerate(slices):
        first = piece.sources[0]
        layers: dict[int, list[tuple[str, str]]] = {}
        for name in names_of(first.model):
            parts = split_layer_name(name)
            if parts is not None:
                layers.setdefault(parts[1], []).append((parts[0], parts[2]))
        for offset in range(piece.length):
            t = offset / (piece.length - 1) if piece.length > 1 else 1.0
            members = layers.get(first.layers[0] + offset)
            if not members:
                raise PlanError(f"slices[{index}]: {describe(first.model)} has no layer "
                                f"{first.layers[0] + offset}; its layers are 0..{max(layers, default=0)}. Check "
                                "the slice's layer_range.")
            for prefix, suffix in members:
                inputs = tuple(f"{prefix}{s.layers[0] + offset}{suffix}" for s in piece.sources)
                base = (f"{prefix}{piece.base_layers[0] + offset}{suffix}" if piece.base_layers is not None
                        else None)
                placements.append(Placement(f"{prefix}{out_layer}{suffix}", index, t, inputs, base))
            out_layer += 1
    # mergekit pairs the last slice's sources with as many names as the first slice has sources
    n_last = min(n_first, len(slices[-1].sources))
    for name in last_names:
        if split_layer_name(name) is None and not PRE_LAYER_PATTERN.search(name):
            placements.append(Placement(name, len(slices) - 1, 0.0, (name,) * n_last, name))
    return placements


def output_layers(slices: list[Slice]) -> int:
    return sum(s.length for s in slices)
