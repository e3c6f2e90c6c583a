"""Partial outputs: temporary files, the resume manifest, and shard checksums.

Every file is written under a temporary name `.NAME.tmp-PID` beside its destination, locked (flock) while its
writer lives, so a later run can tell the debris of a dead run (unlocked: removed) from a live run (locked:
refused). A sharded output also records each completed shard — its size and a checksum computed while it was
written — in `.streammerge-manifest.json` with a fingerprint of the recipe and the inputs, so an interrupted
run can be resumed: completed shards that still verify are kept, everything else is redone.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import zlib
from pathlib import Path
from typing import Callable

from streammerge.errors import OutputError

MANIFEST = ".streammerge-manifest.json"
MANIFEST_FORMAT = "streammerge-partial-output-1"
TEMPORARY = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)$")
READ_BLOCK = 8 * 1024**2


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


def write_atomically(path: Path, text: str) -> None:
    """Write `path` under a temporary name, fsync it and rename it into place (then fsync the directory)."""
    tmp = temporary_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            lock(fd, tmp)
            data = text.encode("utf-8")
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


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


# -- checksums ------------------------------------------------------------------------------------------------

def combine(crcs: list[int]) -> str:
    """One digest for a file from the crc32 of each of its segments (header, then each tensor in file order)."""
    return "crc32x:" + hashlib.sha256(b"".join(c.to_bytes(4, "little") for c in crcs)).hexdigest()[:32]


def crc_of_range(fd: int, position: int, length: int) -> int:
    crc = 0
    buffer = bytearray(min(READ_BLOCK, max(length, 1)))
    view = memoryview(buffer)
    while length:
        n = os.preadv(fd, [view[:min(length, len(buffer))]], position)
        if n == 0:
            raise EOFError
        crc = zlib.crc32(view[:n], crc)
        position, length = position + n, length - n
    return crc


class ShardChecksum:
    """The crc32 of a safetensors file's header and of each tensor's bytes, computed while they are written.

    Tensors may be written in any order; each tensor's pieces are expected in order (the engine writes chunks
    in order). A tensor written otherwise is checksummed from the file when the shard is finished.
    """

    def __init__(self, header: bytes, data_start: int, offsets: dict[str, int], sizes: dict[str, int]):
        self.header_crc = zlib.crc32(header)
        self.data_start = data_start
        self.order = sorted(offsets, key=offsets.get)
        self.offsets, self.sizes = offsets, sizes
        self.next = dict.fromkeys(offsets, 0)  # bytes of each tensor written in order so far
        self.written = dict.fromkeys(offsets, 0)
        self.crc = dict.fromkeys(offsets, 0)
        self.in_order = dict.fromkeys(offsets, True)

    def update(self, name: str, byte_offset: int, data) -> bool:
        """Account for `data` written at `byte_offset` within tensor `name`; True when the tensor is complete."""
        n = len(data)
        if self.in_order[name] and byte_offset == self.next[name]:
            self.crc[name] = zlib.crc32(data, self.crc[name])
            self.next[name] += n
        else:
            self.in_order[name] = False
        self.written[name] += n
        return self.written[name] >= self.sizes[name]

    def digest(self, fd: int) -> str:
        crcs = [self.header_crc]
        for name in self.order:
            if self.in_order[name] and self.next[name] == self.sizes[name]:
                crcs.append(self.crc[name])
            else:
                crcs.append(crc_of_range(fd, self.data_start + self.offsets[name], self.sizes[name]))
        return combine(crcs)


def file_digest(path: Path, header: bytes, offsets: dict[str, int], sizes: dict[str, int]) -> str | None:
    """The digest of an existing file laid out as `header` + tensors; None if it does not start with `header`
    or cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if os.pread(fd, len(header), 0) != header:
            return None
        crcs = [zlib.crc32(header)]
        for name in sorted(offsets, key=offsets.get):
            crcs.append(crc_of_range(fd, len(header) + offsets[name], sizes[name]))
        return combine(crcs)
    except (OSError, EOFError):
        return None
    finally:
        os.close(fd)


# -- the manifest ---------------------------------------------------------------------------------------------

def fingerprint(prepared, headers: list[bytes]) -> dict:
    """What must be unchanged for completed shards to be reusable: the exact shard headers (names, shapes,
    dtypes, layout, recipe metadata), the seed, the program version, and each input file's identity."""
    from streammerge import __version__
    from streammerge.io.output_safety import input_paths

    digest = hashlib.sha256()
    for header in headers:
        digest.update(len(header).to_bytes(8, "little") + header)
    inputs = []
    if prepared is not None:
        checkpoints = prepared.checkpoints + ([prepared.base] if prepared.base is not None else [])
        for path in input_paths(checkpoints):
            st = os.stat(path)
            inputs.append([os.path.realpath(path), st.st_size, st.st_mtime_ns])
    return {"version": __version__, "headers": digest.hexdigest(),
            "seed": getattr(getattr(prepared, "config", None), "seed", 0), "inputs": inputs}


def explain_difference(old: dict, new: dict) -> str | None:
    """Why a manifest's fingerprint does not match this run, in words; None when it matches."""
    if old == new:
        return None
    try:
        return _difference(old, new)
    except (TypeError, ValueError, AttributeError):
        return "its fingerprint is malformed"


def _difference(old: dict, new: dict) -> str:
    if old.get("version") != new["version"]:
        return f"it was written by streammerge {old.get('version')}, this is {new['version']}"
    old_inputs = {p: (s, m) for p, s, m in old.get("inputs", [])}
    new_inputs = {p: (s, m) for p, s, m in new["inputs"]}
    if set(old_inputs) != set(new_inputs):
        changed = sorted(set(old_inputs) ^ set(new_inputs))
        return f"it merged other input files ({changed[0]}{' and more' if len(changed) > 1 else ''})"
    for p in new_inputs:
        if old_inputs[p] != new_inputs[p]:
            return f"the input {p} changed since (size or modification time)"
    if old.get("headers") != new["headers"]:
        return "the recipe differs (tensors, dtypes, shard size, method or parameters)"
    return "the recipe differs (seed)"


class Manifest:
    def __init__(self, fingerprint: dict, completed: dict | None = None):
        self.fingerprint = fingerprint
        self.completed: dict[str, dict] = dict(completed or {})

    @classmethod
    def load(cls, directory: Path) -> "Manifest | None":
        """The manifest in `directory`; None when absent. An unreadable one is refused (not silently ignored)."""
        path = Path(directory) / MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise OutputError(f"'{path}' (left by an interrupted merge) cannot be read ({exc}); remove it and "
                              "rerun without --resume.") from None
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT \
                or not isinstance(data.get("fingerprint"), dict) or not isinstance(data.get("completed"), dict):
            raise OutputError(f"'{path}' is not a manifest this version of streammerge understands; remove it "
                              "and rerun without --resume.")
        return cls(data["fingerprint"], data["completed"])

    def save(self, directory: Path) -> None:
        data = {"format": MANIFEST_FORMAT, "fingerprint": self.fingerprint, "completed": self.completed}
        write_atomically(Path(directory) / MANIFEST, json.dumps(data, indent=1, sort_keys=True) + "\n")


class AtomicFile:
    """A file built under a locked temporary name beside `path` (mode 0666 & ~umask, like any file a user's
    program creates), written at offsets, and renamed into place only by `commit()` after an fsync.
    `abort()` removes whatever it created: the temporary file, or the file it already committed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp_path = temporary_path(self.path)
        self.fd = -1
        self.committed: Path | None = None

    def create(self) -> None:
        try:
            self.fd = os.open(self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise write_error(self.path, exc) from None
        try:
            lock(self.fd, self.tmp_path)  # a later run can tell our debris (if we die) from a live writer
        except BaseException:
            self.abort()
            raise

    def write_at(self, data, position: int) -> None:
        view = memoryview(data).cast("B")
        try:
            while view:
                done = os.pwrite(self.fd, view, position)
                view, position = view[done:], position + done
        except OSError as exc:
            raise write_error(self.path, exc) from None

    def commit(self, destination: Path | None = None) -> None:
        """fsync the file and rename it to `destination` (default: its path), then fsync the directory."""
        from streammerge.interrupts import uninterruptible

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
            if path is not None:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        self.committed = None
