"""Memory-mapped input files and the tensors that live at byte offsets inside them.

Every reader reduces its format to `TensorInfo` records: a name, a shape, a dtype and where the bytes sit in a
mapped file. Reading a chunk is then a zero-copy view, and releasing it unmaps its pages from this process
(MADV_DONTNEED), so mapped inputs never accumulate in RAM; the caller decides whether the pages also leave the
page cache (POSIX_FADV_DONTNEED): the engine drops only what it had to read from disk, and keeps pages that a
later pass reads again.
"""

from __future__ import annotations

import collections
import ctypes
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from streammerge.errors import CheckpointError

PAGE = mmap.PAGESIZE
LARGE_FOLIO = 2 << 20  # the largest page-cache folio readahead makes (a PMD on x86-64)
DROPPED_RUNS = 4096  # runs of dropped ranges remembered per file (many when tensors are read out of file order)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
FLOAT_DTYPES = {torch.float64, torch.float32, torch.float16, torch.bfloat16}
try:  # float8 types exist only in newer torch builds
    FLOAT_DTYPES |= {torch.float8_e4m3fn, torch.float8_e5m2}
except AttributeError:  # pragma: no cover
    pass


class MappedFile:
    """A read-only, private mapping of a whole file (pages stay file-backed: they never count as anonymous)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot open for reading ({exc.strerror}).") from exc
        self.size = os.fstat(self.fd).st_size
        # ACCESS_COPY (MAP_PRIVATE): the buffer is writable for torch.frombuffer, but nothing is ever written,
        # so no page is copied and the file itself can never change.
        self.mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY) if self.size else None
        # [first, end) of the latest runs of back-to-back ranges dropped from the page cache (swept again at close)
        self.dropped: collections.deque[list[int]] = collections.deque(maxlen=DROPPED_RUNS)
        self.address = 0
        if self.mm is not None:
            anchor = ctypes.c_char.from_buffer(self.mm)
            self.address = ctypes.addressof(anchor)
            del anchor  # release the buffer export so the mapping can be closed

    def bytes_view(self, offset: int, nbytes: int) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self.mm, dtype=torch.uint8, count=nbytes, offset=offset)

    def _page_range(self, offset: int, nbytes: int):
        """Pages touching [offset, offset + nbytes): for our own mapping, where rounding out is harmless."""
        start = offset - offset % PAGE
        end = min(self.size, offset + nbytes)
        return start, max(0, end - start)

    def _inner_pages(self, offset: int, nbytes: int):
        """Pages lying wholly inside the range: page-cache decisions must not spill onto neighbouring data."""
        start = -(-offset // PAGE) * PAGE
        end = offset + nbytes if offset + nbytes >= self.size else (offset + nbytes) // PAGE * PAGE
        return start, max(0, end - start)

    def is_cached(self, offset: int, nbytes: int) -> bool:
        """Whether every page holding a byte of this range is in the page cache already (mincore)."""
        start, length = self._page_range(offset, nbytes)
        if self.mm is None or not length:
            return True
        vec = (ctypes.c_ubyte * ((length + PAGE - 1) // PAGE))()
        if _libc.mincore(self.address + start, length, vec) != 0:
            return False
        return 0 not in bytes(vec)

    def release(self, offset: int, nbytes: int, drop_cache: bool = True) -> None:
        """Unmap this range's pages from the process and, with `drop_cache`, drop the pages wholly inside it
        (and in the ranges dropped just before it, back to back) from the page cache; they are re-read if needed
        again."""
        start, length = self._page_range(offset, nbytes)
        if self.mm is None or not length:
            return
        self.mm.madvise(mmap.MADV_DONTNEED, start, length)
        if drop_cache:
            if self.dropped and self.dropped[-1][1] == offset:
                self.dropped[-1][1] = offset + nbytes
            else:
                self.dropped.append([offset, offset + nbytes])
            # Readahead caches a file in large folios, and the kernel drops only the folios wholly inside a range:
            # one straddling the ranges dropped just before this one goes with it.
            reach = max(self.dropped[-1][0], offset - LARGE_FOLIO)
            self._drop_cache(reach, offset + nbytes - reach)

    def _drop_cache(self, offset: int, nbytes: int) -> None:
        start, length = self._inner_pages(offset, nbytes)
        if length:
            os.posix_fadvise(self.fd, start, length, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:  # a tensor view is still alive; the mapping goes when it does
                pass
            self.mm = None
        if self.fd >= 0:
            # The kernel does not drop pages still mapped, and mapping a page maps its cached neighbours too (fault-
            # around): pages of ranges already released were mapped again by reads of the next ones. Unmapped now.
            for first, end in self.dropped:
                self._drop_cache(first, end - first)
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True, eq=False, slots=True)  # slots: a checkpoint may hold 100,000s of them
class TensorInfo:
    """One tensor of a checkpoint: its name, shape, dtype and where its bytes are."""

    name: str
    shape: tuple
    dtype: torch.dtype
    file: MappedFile
    offset: int  # byte offset of element 0 (storage start + storage_offset * itemsize)
    stride: tuple | None = None  # None: contiguous
    delta: object | None = None  # a low-rank update added when read for merging (a LoRA adapter's)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def span(self) -> tuple[int, int]:
        """(offset, nbytes) of the bytes this tensor reads, strided or not."""
        if self.stride is None or self.numel == 0:
            return self.offset, self.nbytes
        last = sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        return self.offset, (last + 1) * self.itemsize

    @property
    def storage_key(self) -> tuple:
        """Tensors with equal keys in one file are the same bytes (tied weights)."""
        return (id(self.file), self.offset, self.shape, self.stride, self.dtype, id(self.delta))

    @property
    def aligned(self) -> bool:
        """Whether the bytes can be viewed in place as this dtype (legacy torch files often are not aligned)."""
        return self.offset % self.itemsize == 0

    def read(self, start: int = 0, stop: int | None = None, staging: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor; a view into the mapping where possible.
        Unaligned bytes are copied, into `staging` (a reusable uint8 buffer) when given."""
        stop = self.numel if stop is None else stop
        if self.stride is None:
            raw = self.file.bytes_view(self.offset + start * self.itemsize, (stop - start) * self.itemsize)
            if not self.aligned:
                raw = staging[:raw.numel()].copy_(raw) if staging is not None else raw.clone()
            return raw.view(self.dtype)
        base, nbytes = self.span
        raw = self.file.bytes_view(base, nbytes)
        if base % self.itemsize == 0:
            return flat_slice(raw.view(self.dtype).as_strided(self.shape, self.stride), start, stop)
        # Unaligned and strided (legacy files): the same strides over bytes, with each element's bytes as a last
        # dimension, need no alignment; only this chunk's elements are then copied, never the whole tensor.
        size = self.itemsize
        as_bytes = raw.as_strided(self.shape + (size,), tuple(s * size for s in self.stride) + (1,))
        part = flat_slice(as_bytes, start * size, stop * size)
        copy = (staging[:part.numel()].copy_(part) if staging is not None
                else part.clone(memory_format=torch.contiguous_format))
        return copy.view(self.dtype)

    def is_cached(self, start: int, stop: int) -> bool:
        if self.stride is None:
            return self.file.is_cached(self.offset + start * self.itemsize, (stop - start) * self.itemsize)
        return self.file.is_cached(*self.span)

    def release(self, start: int = 0, stop: int | None = None, drop_cache: bool = True) -> None:
        if self.stride is None:
            stop = self.numel if stop is None else stop
            self.file.release(self.offset + start * self.itemsize, (stop - start) * self.itemsize, drop_cache)
        elif stop is None or stop >= self.numel:  # strided: its bytes interleave, release once at the end
            self.file.release(*self.span, drop_cache=drop_cache)


def flat_slice(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of t in row-major order, copying only those elements (a strided tensor's rows
    can be far larger than a chunk, so whole rows are never copied for a part of them)."""
    if t.is_contiguous():
        return t.reshape(-1)[start:stop]
    if stop <= start:
        return t.new_empty(0)
    if t.dim() == 0:
        return t.reshape(1)[start:stop]
    row = math.prod(t.shape[1:]) or 1
    first, last = start // row, (stop - 1) // row
    if first == last:
        return flat_slice(t[first], start - first * row, stop - first * row)
    parts = [flat_slice(t[first], start - first * row, row)]
    if last > first + 1:
        parts.append(t[first + 1:last].reshape(-1))
    parts.append(flat_slice(t[last], 0, stop - last * row))
    return torch.cat(parts)


def check_span(info: TensorInfo) -> None:
    """Refuse a tensor whose bytes lie outside its file."""
    offset, nbytes = info.span
    if offset < 0 or offset + nbytes > info.file.size:
        raise CheckpointError(
            f"{info.file.path}: tensor '{info.name}' needs bytes {offset}..{offset + nbytes} but the file has "
            f"{info.file.size}; the file is truncated or corrupt. Re-download or re-export it.")
