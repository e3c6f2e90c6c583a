"""A vocabulary-indexed tensor (embedding, output embedding) read through the output vocabulary.

`VocabRows` is a TensorInfo whose rows are the output tokens: a row the model has is read from its mapped
tensor; a row it lacks is computed from the rows named by the vocabulary (another model's row, the mean of
several, zeros); padding rows are the mean of the model's rows. Reads are chunked like any other input and
go straight into the engine's staging buffer: nothing the size of the tensor is ever held in RAM. A model read
with a LoRA adapter gives its rows with the adapter's update added (as mergekit merges the adapter first), in
blocks of DELTA_BLOCK elements.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from streammerge.hf.tokenizer import RowSources
from streammerge.io import TensorInfo

VOCAB_TENSOR = re.compile(r"(^|\.)(embed_tokens|lm_head|embed_in|embed_out|wte|word_embeddings)\.weight$")
MEAN_BLOCK = 1 << 20  # elements per block when summing rows for the padding mean
DELTA_BLOCK = 1 << 18  # elements per block when adding a LoRA update to rows (two float32 buffers of this size)


def vocabulary_tensors(tensors: dict[str, TensorInfo], vocab_size: int) -> list[str]:
    """Names of a model's tensors indexed by token (first dimension = its vocab_size)."""
    return [n for n, info in tensors.items()
            if VOCAB_TENSOR.search(n) and len(info.shape) == 2 and info.shape[0] == vocab_size and info.is_float]


@dataclass(frozen=True, eq=False)
class VocabRows(TensorInfo):
    source: TensorInfo = None
    rows: RowSources = None
    others: list = field(default_factory=list)  # per model: its TensorInfo of this name (for default rows)
    _mean: list = field(default_factory=list)  # the padding row, computed on first use

    @staticmethod
    def of(source: TensorInfo, rows: RowSources, others: list) -> "VocabRows":
        return VocabRows(source.name, (rows.padded_rows, source.shape[1]), source.dtype, source.file, source.offset,
                         source=source, rows=rows, others=others)

    @property
    def aligned(self) -> bool:
        return False  # rows are gathered into the engine's staging buffer

    @property
    def storage_key(self) -> tuple:
        return ("vocab", id(self.source.file), self.source.offset, self.shape, self.dtype, id(self.source.delta))

    @property
    def hidden(self) -> int:
        return self.shape[1]

    def read(self, start: int = 0, stop: int | None = None, staging: torch.Tensor | None = None) -> torch.Tensor:
        stop = self.numel if stop is None else stop
        n = stop - start
        out = (staging[:n * self.itemsize].view(self.dtype) if staging is not None
               else torch.empty(n, dtype=self.dtype))
        h, pos = self.hidden, 0
        while pos < n:
            row, col = divmod(start + pos, h)
            if col == 0 and n - pos >= h:
                count = (n - pos) // h
                self._fill(row, row + count, out[pos:pos + count * h].view(count, h))
                pos += count * h
            else:
                take = min(h - col, n - pos)
                line = torch.empty((1, h), dtype=self.dtype)
                self._fill(row, row + 1, line)
                out[pos:pos + take] = line[0, col:col + take]
                pos += take
        return out

    def _fill(self, first: int, last: int, dest: torch.Tensor) -> None:
        """Output rows [first, last) into dest (last - first, hidden)."""
        real_last = min(last, self.rows.real_rows)
        if first < real_last:
            own = self.rows.own[first:real_last]
            for a, b in _runs(own):
                if own[a] >= 0:  # a run of rows that are consecutive in the model's own tensor
                    copy_rows(self.source, int(own[a]), int(own[a] + b - a), dest[a:b])
                else:
                    for i in range(a, b):
                        dest[i].copy_(self._default(first + i))
        if last > self.rows.real_rows:
            dest[max(0, self.rows.real_rows - first):].copy_(self._padding())

    def _default(self, row: int) -> torch.Tensor:
        picks = self.rows.defaults.get(row, [])
        if not picks:
            return torch.zeros(self.hidden, dtype=self.dtype)
        total = torch.zeros(self.hidden, dtype=torch.float32)
        row_buffer = torch.empty((1, self.hidden), dtype=torch.float32)
        for model, source_row in picks:
            total += copy_rows(self.others[model], source_row, source_row + 1, row_buffer)[0]
        return (total / len(picks)).to(self.dtype)

    def _padding(self) -> torch.Tensor:
        """The mean of this model's rows in the output vocabulary (as suggested for vocabulary expansion)."""
        if not self._mean:
            total = torch.zeros(self.hidden, dtype=torch.float64)
            block = max(1, MEAN_BLOCK // self.hidden)
            buffer = torch.empty((block, self.hidden), dtype=self.dtype)
            for first in range(0, self.rows.real_rows, block):
                last = min(self.rows.real_rows, first + block)
                self._fill(first, last, buffer[:last - first])
                total += buffer[:last - first].double().sum(0)
            self.source.release(drop_cache=False)
            self._mean.append((total / max(1, self.rows.real_rows)).to(self.dtype))
        return self._mean[0]

    def is_cached(self, start: int, stop: int) -> bool:
        return self.source.is_cached(0, self.source.numel)

    def release(self, start: int = 0, stop: int | None = None, drop_cache: bool = True) -> None:
        if stop is None or stop >= self.numel:  # rows are gathered from anywhere: release once, at the end
            self.source.release(drop_cache=drop_cache)
            for other in self.others:
                if other is not None and other is not self.source:
                    other.release(drop_cache=drop_cache)


def copy_rows(info: TensorInfo, first: int, last: int, dest: torch.Tensor) -> torch.Tensor:
    """Rows [first, last) of a model's 2-D tensor into dest (last - first, hidden), with the model's LoRA update
    (info.delta) added in float32 before the cast to dest's dtype."""
    h = info.shape[1]
    if info.delta is None:
        return dest.copy_(info.read(first * h, last * h).view(last - first, h))
    rows = max(1, DELTA_BLOCK // h)
    scratch = torch.empty(max(info.delta.rank + 1, min(DELTA_BLOCK, (last - first) * h)), dtype=torch.float32)
    for a in range(first, last, rows):
        b = min(last, a + rows)
        block = info.read(a * h, b * h).to(torch.float32, copy=True)
        info.delta.add_to(block, a * h, b * h, scratch)
        dest[a - first:b - first].copy_(block.view(b - a, h))
    return dest


def _runs(own: np.ndarray):
    """[a, b) ranges of `own` that are either consecutive model rows or all defaults (-1)."""
    if len(own) == 0:
        return
    step = np.diff(own)
    breaks = np.nonzero(~(((step == 1) & (own[:-1] >= 0)) | ((own[:-1] < 0) & (own[1:] < 0))))[0] + 1
    edges = [0, *breaks.tolist(), len(own)]
    yield from zip(edges[:-1], edges[1:])
