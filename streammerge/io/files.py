"""File-system helpers every output shares: temporary files that appear only on commit, locks that tell a live
writer from a dead run's debris, fsync, early writeback, and errors that name the file.

Every file is written under a temporary name `.NAME.tmp-PID` beside its destination, locked (flock) while its
writer lives, so a later run can tell the debris of a dead run (unlocked: removed) from a live run (locked:
refused).
"""

from __future__ import annotations

import collections
import ctypes
import errno
import fcntl
import os
import re
from pathlib import Path
from typing import Callable

from streammerge.errors import OutputError
from streammerge.interrupts import uninterruptible

TEMPORARY = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)$")
_libc = ctypes.CDLL(None, use_errno=True)
_SYNC_FILE_RANGE_WAIT_BEFORE, _SYNC_FILE_RANGE_WRITE, _SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def lock(fd: int, path: Path) -> None:
    """Hold an exclusive lock on `fd` while it stays open (the kernel drops it when the process dies), or refuse
    if another process holds one: this is how a later run tells a live writer from a dead one's debris."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise OutputError(f"'{path}' is being written by another streammerge run; wait for it to finish or "
                              "choose another output path.") from None
        # File systems without flock support: go on unlocked.


def remove_stale_temporaries(directory: Path, is_ours: Callable[[str], bool]) -> list[Path]:
    """Remove `.NAME.tmp-PID` files for our destination names whose writer is gone; refuse if one is live."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = TEMPORARY.match(entry.name)
        if not match or not is_ours(match.group("target")) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise OutputError(
                        f"another streammerge run (process {match.group('pid')}) is writing "
                        f"'{Path(directory) / match.group('target')}' right now; wait for it to finish or choose "
                        "another output path.") from None
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        finally:
            os.close(fd)
    return removed


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> None:
    if nbytes and hasattr(_libc, "sync_file_range"):  # (Linux only: elsewhere the final fsync does it all)
        _libc.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(nbytes), flags)


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing these dirty pages to disk now (asynchronously), so the final fsync has little left to do."""
    _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


class WriteBehind:
    """Writeback of a file as it is written, its pages let go behind the writer: each range written is sent to disk
    at once (asynchronously); once more than LAG_BYTES have been sent after it, it is waited for (mostly written by
    then) and dropped from the page cache. Kept there, an output would grow the cache by its whole size, pushing out
    what the machine holds (on a small one, the inputs still to be read), and filling ever new cache pages costs
    more than reusing the same few (a warm 5.6 GB linear merge spent about 4 s of system time copying its 1.87 GB
    output into the cache, 1.2-1.6 s with this). The final fsync still makes the whole file durable."""

    LAG_BYTES = 64 * 1024**2

    def __init__(self, fd: int):
        self.fd = fd
        self.sent: collections.deque[tuple[int, int]] = collections.deque()  # (offset, bytes), oldest first
        self.sent_bytes = 0

    def written(self, offset: int, nbytes: int) -> None:
        if not nbytes:
            return
        start_writeback(self.fd, offset, nbytes)
        self.sent.append((offset, nbytes))
        self.sent_bytes += nbytes
        while self.sent_bytes > self.LAG_BYTES:
            offset, nbytes = self.sent.popleft()
            self.sent_bytes -= nbytes
            _sync_file_range(self.fd, offset, nbytes,
                             _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER)
            os.posix_fadvise(self.fd, offset, nbytes, os.POSIX_FADV_DONTNEED)  # (clean pages wholly inside only)


def pwrite_all(fd: int, data, position: int) -> None:
    """Write all of `data` (any buffer) at `position`; os.pwrite may write less than asked."""
    view = memoryview(data).cast("B")
    while view:
        done = os.pwrite(fd, view, position)
        view, position = view[done:], position + done


def write_atomically(path: Path, text: str | bytes) -> None:
    """Write `path` under a temporary name, fsync it and rename it into place (then fsync the directory)."""
    tmp = temporary_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            lock(fd, tmp)
            data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        unlink_if_present(tmp)
        raise


def unlink_if_present(path: Path | None) -> None:
    if path is None:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def make_directories(path: Path) -> list[Path]:
    """Create `path` and missing parents; return those created (innermost first) so an abort can remove them."""
    created = []
    while not path.exists():
        created.append(path)
        path = path.parent
    for directory in reversed(created):
        directory.mkdir()
    return created


def remove_directories(created: list[Path]) -> None:
    """Remove the directories a run created (innermost first) once its own files are gone, only while empty:
    whatever another run or the user put there meanwhile stays, with the directories that hold it."""
    for directory in created:
        try:
            os.rmdir(directory)
        except OSError:  # not empty (someone else's files), or already gone
            pass


def write_error(path: Path, exc: OSError) -> OutputError:
    """An OSError met while writing an output file, as one paragraph that names the file and the remedy."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "the disk (or your quota) is full: free some space or choose an output on another disk"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "choose an output location you can write to"
    elif exc.errno == errno.EFBIG:
        hint = "the file system or a size limit (ulimit -f) refuses a file this large"
    else:
        hint = "check the output location"
    return OutputError(f"cannot write '{path}': {reason}; {hint}. The partial output was removed.")


class AtomicFile:
    """A file built under a locked temporary name beside `path` (mode 0666 & ~umask, like any file a user's
    program creates), written at offsets, and renamed into place only by `commit()` after an fsync.
    `abort()` removes whatever it created: the temporary file, or the file it already committed."""

    WRITEBACK_BYTES = 8 * 1024**2

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp_path = temporary_path(self.path)
        self.fd = -1
        self.committed: Path | None = None
        self._dirty: tuple[int, int] | None = None  # [start, end) of what was written since the last writeback

    def write_back(self, position: int, nbytes: int) -> None:
        """`nbytes` at `position` were written: start their writeback (`WriteBehind`) once WRITEBACK_BYTES
        have gathered, so a file of many small tensors costs one system call per few MiB, not one per tensor."""
        start, end = (position, position + nbytes) if self._dirty is None else (
            min(self._dirty[0], position), max(self._dirty[1], position + nbytes))
        if end - start >= self.WRITEBACK_BYTES or nbytes >= self.WRITEBACK_BYTES:
            self._behind.written(start, end - start)
            self._dirty = None
        else:
            self._dirty = (start, end)

    def create(self) -> None:
        try:
            self.fd = os.open(self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise write_error(self.path, exc) from None
        self._behind = WriteBehind(self.fd)
        try:
            lock(self.fd, self.tmp_path)  # a later run can tell our debris (if we die) from a live writer
        except BaseException:
            self.abort()
            raise

    def write_at(self, data, position: int) -> None:
        try:
            pwrite_all(self.fd, data, position)
        except OSError as exc:
            raise write_error(self.path, exc) from None

    def commit(self, destination: Path | None = None) -> None:
        """fsync the file and rename it to `destination` (default: its path), then fsync the directory."""
        destination = self.path if destination is None else Path(destination)
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            with uninterruptible():  # an interrupt between these two lines would hide the file from abort()
                os.replace(self.tmp_path, destination)
                self.committed = destination
            fsync_directory(destination.parent)
        except OSError as exc:
            raise write_error(self.path, exc) from None

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for path in (self.tmp_path, self.committed):
            unlink_if_present(path)
        self.committed = None
