"""The RAM budget: what the process may hold, what the machine (and its cgroup) can give, and a guard that
samples anonymous RSS during the run and stops cleanly before the budget is exceeded by much.

Anonymous memory (RssAnon) is what counts: file-backed pages of mapped inputs are reclaimable.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import psutil

from streammerge.errors import MemoryBudgetError
from streammerge.units import format_size

MIB = 1024**2
# Room for Python objects, tqdm, the plan and allocator slack on top of the chunk buffers.
OVERHEAD = 24 * MIB
MIN_CHUNK_ELEMENTS = 256 * 1024
# Bytes the output's records take per output tensor, allocated when the run starts (its placement, offsets,
# header text; measured: 16 MiB for 50,000 tensors into one safetensors file, about 340 bytes each).
OUTPUT_BYTES_PER_TENSOR = 512
MAX_CHUNK_ELEMENTS = 16 * MIB  # larger chunks stop paying off (cache effects, progress granularity)
# Chunks are a multiple of this, so every chunk boundary falls on the grid that methods use for whole-tensor
# statistics and random draws: results are then the same for every chunk size.
CHUNK_ALIGN = 64 * 1024


def anon_rss() -> int:
    """Anonymous resident memory of this process, in bytes."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    info = psutil.Process().memory_info()
    return info.rss - getattr(info, "shared", 0)


def _cgroup_dirs() -> list[Path]:
    """Memory cgroup directories of this process, innermost first (v2 unified or v1 memory controller)."""
    dirs = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return dirs
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":
            root = Path("/sys/fs/cgroup")
        elif "memory" in controllers.split(","):
            root = Path("/sys/fs/cgroup/memory")
        else:
            continue
        path = root / rel.lstrip("/")
        while True:
            dirs.append(path)
            if path == root:
                break
            path = path.parent
    return dirs


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def cgroup_headroom() -> int | None:
    """The smallest (limit - usage) over this process's memory cgroups, or None when no limit applies."""
    headroom = None
    for d in _cgroup_dirs():
        for limit_file, usage_file in (("memory.max", "memory.current"),
                                       ("memory.limit_in_bytes", "memory.usage_in_bytes")):
            limit, usage = _read_int(d / limit_file), _read_int(d / usage_file)
            if limit is None or usage is None or limit >= 1 << 60:
                continue
            # Page cache counts towards usage but is reclaimable; a v1 "cache" figure lets us credit it.
            reclaimable = _cgroup_cache(d)
            room = max(0, limit - usage + reclaimable)
            headroom = room if headroom is None else min(headroom, room)
    return headroom


def _cgroup_cache(d: Path) -> int:
    try:
        for line in (d / "memory.stat").read_text().splitlines():
            key, value = line.split()
            if key in ("total_inactive_file", "inactive_file"):
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def available_memory() -> int:
    """How much more this process can allocate now: the smaller of the machine's view (psutil) and the
    headroom left under its cgroup's limit."""
    available = psutil.virtual_memory().available
    headroom = cgroup_headroom()
    return min(available, headroom) if headroom is not None else available


def bytes_per_element(n_inputs: int, acc_itemsize: int, out_itemsize: int, extra_buffers: int = 0,
                      staging_itemsize: int = 0) -> int:
    """Working memory per chunk element: one scratch per input, method extras, two accumulators and two
    output buffers (one chunk is written while the next is computed), and staging for unaligned inputs."""
    return (n_inputs + 2 + extra_buffers) * acc_itemsize + 2 * out_itemsize + staging_itemsize


class Budget:
    """How big chunks may be, given the budget and what the process already holds."""

    def __init__(self, requested: int | None, per_element: int, default: int, baseline: int | None = None,
                 largest_tensor: int | None = None, output_tensors: int = 0, reserve: int = 0, statistics: int = 0):
        self._args = (requested, per_element, default, largest_tensor, output_tensors, reserve, statistics)
        self.reserve, self.largest_tensor = reserve, largest_tensor
        self.baseline = anon_rss() if baseline is None else baseline
        # What the run will hold besides the buffers: the margin, the output's records beyond what it covers, the
        # largest statistics a tensor keeps (`Method.stats_bytes`) and what the caller keeps for others in the same
        # process.
        self.reserved = (OVERHEAD + reserve + statistics
                         + max(0, output_tensors * OUTPUT_BYTES_PER_TENSOR - OVERHEAD // 2))
        self.per_element = per_element
        self.available = available_memory()  # more than the baseline, which the process already holds
        self.ceiling = self.baseline + self.available  # the most this process could hold without swapping or OOM
        self.minimum = self.baseline + self.reserved + MIN_CHUNK_ELEMENTS * per_element
        # By default, leave at least half of what the machine (or cgroup) can still give to everything else.
        default_limit = self.baseline + self.available // 2
        if requested is None:
            self.limit = min(default, default_limit)
            explicit = False
        else:
            self.limit = requested
            explicit = True
        if self.limit < self.minimum:
            why = (f"the budget max_ram={format_size(self.limit)} is too small to work in" if explicit else
                   f"this machine (and its cgroup) can give only {format_size(self.available)} more memory, and "
                   f"by default streammerge takes at most half of that (a budget of {format_size(self.limit)})")
            raise MemoryBudgetError(
                f"{why}: the process already holds {format_size(self.baseline)} (Python, torch and the plan) and "
                f"needs {format_size(self.reserved + MIN_CHUNK_ELEMENTS * per_element)} more for its smallest "
                "chunks and the output's records"
                + (f", {format_size(statistics)} of them for the per-row or per-column statistics of its largest "
                   "tensor. " if statistics else ". ")
                + f"The smallest budget that works is {format_size(self.minimum)}; "
                + ("set max_ram to at least that." if explicit else
                   f"free some memory, or set max_ram between {format_size(self.minimum)} and "
                   f"{format_size(self.ceiling)} to use more of what is left." if self.minimum <= self.ceiling else
                   "free some memory."))
        if explicit and self.limit > self.ceiling:
            suggested = default_limit if default_limit >= self.minimum else self.ceiling
            advice = (f"lower max_ram to {format_size(suggested)} or less (at least {format_size(self.minimum)} "
                      "is needed)" if self.minimum <= self.ceiling else
                      f"free some memory: even the smallest budget that works, {format_size(self.minimum)}, does "
                      "not fit")
            raise MemoryBudgetError(
                f"max_ram={format_size(self.limit)} is more than this process can get: it holds "
                f"{format_size(self.baseline)} and only {format_size(self.available)} more is available (free RAM, "
                f"and the limit of its cgroup), {format_size(self.ceiling)} in all. Going over would end in "
                f"swapping or the process being killed; {advice}.")
        self.chunk_elements = self._chunk(self.limit - self.baseline - self.reserved)

    def _chunk(self, room: int) -> int:
        """Elements per chunk when `room` bytes are left for the buffers."""
        chunk = max(MIN_CHUNK_ELEMENTS, min(MAX_CHUNK_ELEMENTS, room // self.per_element))
        if self.largest_tensor is not None:  # buffers larger than the largest tensor would never be filled
            chunk = min(chunk, max(MIN_CHUNK_ELEMENTS, -(-self.largest_tensor // CHUNK_ALIGN) * CHUNK_ALIGN))
        return chunk // CHUNK_ALIGN * CHUNK_ALIGN

    def remeasured(self) -> "Budget":
        """The same budget for what the process holds now (a long-lived worker's own memory moves between tasks)."""
        requested, per_element, default, largest_tensor, output_tensors, reserve, statistics = self._args
        return Budget(requested, per_element, default, None, largest_tensor, output_tensors, reserve, statistics)

    def chunk_at(self, limit: int, baseline: int, reserve: int) -> int:
        """The chunk this merge would get under `limit` in a process holding `baseline` (a task's, as the driver
        of a distributed merge estimates it; the task's own budget checks the limit)."""
        reserved = self.reserved - self.reserve + reserve
        return self._chunk(limit - baseline - reserved)

    @property
    def estimated_peak(self) -> int:
        return self.baseline + self.reserved - OVERHEAD // 2 + self.chunk_elements * self.per_element


class MemoryGuard:
    """Samples anonymous RSS in a background thread; records the peak and flags a budget overrun."""

    def __init__(self, limit: int, interval: float = 0.005):
        self.limit = limit
        self.interval = interval
        self.peak = anon_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streammerge-memory-guard", daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> int:
        now = anon_rss()
        self.peak = max(self.peak, now)
        return now

    def check(self, where: str) -> None:
        """Raise if the budget was exceeded (called between chunks, so the run stops cleanly)."""
        if self.peak > self.limit:
            raise MemoryBudgetError(
                f"anonymous memory reached {format_size(self.peak)}, over the max_ram budget of "
                f"{format_size(self.limit)}, while processing {where}; stopped before the system ran out. "
                "Raise max_ram, or report this as a bug with the config that caused it.")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


# Peak bytes of Python objects per byte of JSON header or index, or of a checkpoint's pickle, while it is parsed
# and turned into tensor records (measured: a 91 MB header of 800,000 tensors grew anonymous memory by 782 MiB,
# about 9x; the pickle of a state dict of 200,000 tensors about 8x). Structures whose parse fits in the OVERHEAD
# margin every budget keeps are not checked here.
PARSE_BYTES_PER_BYTE = 10


# torch's own unpickler cannot be watched while it runs, so a pickle goes to it only if it fits at the worst rate:
# an empty set costs 216 bytes for 2 bytes of pickle (EMPTY_SET, APPEND), about 113x (measured; empty dicts and
# lists about 36x). Larger pickles are read by the restricted unpickler, which checks memory as it builds.
PICKLE_WORST_BYTES_PER_BYTE = 128


def _budget_words(max_ram: int | None, limit: int) -> str:
    return f"the budget ({'max_ram ' if max_ram is not None else 'default, '}{format_size(limit)})"


def parse_limit(max_ram: int | None) -> int:
    """The anonymous memory the process may reach while parsing: `max_ram`, or by default what it holds now plus
    half of the memory it can still get."""
    return max_ram if max_ram is not None else anon_rss() + available_memory() // 2


def parse_fits(nbytes: int, max_ram: int | None, per_byte: int = PARSE_BYTES_PER_BYTE) -> bool:
    need = nbytes * per_byte
    return need <= OVERHEAD or anon_rss() + need <= parse_limit(max_ram)


def check_parse_room(path, what: str, nbytes: int, max_ram: int | None) -> None:
    """Refuse to parse `nbytes` of JSON or pickle when that would take the process beyond its budget
    (`max_ram`, or by default half of the memory it can still get), before any of it is parsed."""
    if parse_fits(nbytes, max_ram):
        return
    need = nbytes * PARSE_BYTES_PER_BYTE
    held, limit = anon_rss(), parse_limit(max_ram)
    raise MemoryBudgetError(
        f"{path}: its {what} is {format_size(nbytes)}; reading it takes about {format_size(need)} of "
        f"memory, but {_budget_words(max_ram, limit)} leaves {format_size(max(0, limit - held))} beside what the "
        f"process holds. Real checkpoints have far smaller {what}s: check the file; if it is genuine, set max_ram to "
        f"at least {format_size(held + need)}.")


class MemoryCheckedFile:
    """A binary file as a parser reads it, with the process's memory checked as the parser goes: before a read,
    that what it reads fits the budget at PARSE_BYTES_PER_BYTE, and after every CHECK_EVERY bytes read, that
    what the parser built so far does (whatever the bytes hold). For parsers whose input size is not known up
    front (a legacy torch file's pickle) or whose objects may cost more than the usual rate."""

    # 16 KiB of pickle build at most about 2 MiB between checks, even at the worst rate (113x: empty sets).
    CHECK_EVERY = 16 * 1024

    def __init__(self, file, path, what: str, max_ram: int | None):
        self.file, self.path, self.what, self.max_ram = file, path, what, max_ram
        self.limit = parse_limit(max_ram)
        self.consumed = self.unchecked = 0
        # What the parser may allocate at once beyond what it holds, kept free (an unpickler's memo and stack
        # grow by reallocation: a dict of 600,000 entries takes 24 MiB more in one step).
        self.reserve: Callable[[], int] = lambda: 0

    def read(self, n: int = -1) -> bytes:
        if n is not None and n * PARSE_BYTES_PER_BYTE > OVERHEAD:  # a large read is checked before it is made
            self._check(n)
        return self._count(self.file.read(n))

    def readline(self) -> bytes:
        return self._count(self.file.readline())

    def _count(self, data: bytes) -> bytes:
        self.consumed += len(data)
        self.unchecked += len(data)
        if self.unchecked >= self.CHECK_EVERY:
            self._check(0)
        return data

    def _check(self, ahead: int) -> None:
        self.unchecked = 0
        held = anon_rss()
        if held + ahead * PARSE_BYTES_PER_BYTE + self.reserve() <= self.limit:
            return
        about = (f"it asks to read {format_size(ahead)} at once" if ahead else
                 f"after {format_size(self.consumed)} of it the process holds {format_size(held)}")
        raise MemoryBudgetError(
            f"{self.path}: reading its {self.what} would take the process beyond "
            f"{_budget_words(self.max_ram, self.limit)}: {about}. Real checkpoints need far less: check the file; "
            "if it is genuine, raise max_ram.")
