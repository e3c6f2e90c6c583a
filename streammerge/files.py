"""Reading small files (configs, shard indexes) safely: regular files only, and never more than a bound."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from streammerge.errors import ConfigError


def read_regular_file(path: Path, limit: int, what: str, error=ConfigError) -> bytes:
    """The bytes of `path` if it is a regular file of at most `limit` bytes; `error` otherwise.

    Opened non-blocking, so a FIFO cannot stall the open, and checked with fstat on the open descriptor, so
    what is read is what was checked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror}).") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise error(f"{path}: is a directory, not a {what} file.")
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: is not a regular file (a pipe, a device or a socket); give the path of a "
                        f"{what} file.")
        if info.st_size > limit:
            raise error(f"{path}: is {info.st_size} bytes; as a {what} that is far larger than any real one (the "
                        f"limit is {limit} bytes). Check the path.")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise error(f"{path}: grew beyond {limit} bytes while being read; a {what} is at most {limit} bytes.")
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror}).") from None
    finally:
        os.close(fd)
