"""A nested memory cgroup for tests that prove a RAM bound (v1 or v2; skipped where not writable)."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import pytest


def _own_memory_cgroup() -> tuple[Path, str] | None:
    """(directory of this process's memory cgroup, 'v1' or 'v2')."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / rel.lstrip("/"), "v1"
    for line in lines:
        if line.startswith("0::"):
            return Path("/sys/fs/cgroup") / line[3:].lstrip("/"), "v2"
    return None


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int):
    """Yield a cgroup directory limited to `limit_bytes`; skip the test if one cannot be made."""
    found = _own_memory_cgroup()
    if found is None:
        pytest.skip("no memory cgroup controller visible")
    parent, version = found
    path = parent / f"streammerge-test-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup under {parent}: {exc}")
    try:
        limit_file = "memory.limit_in_bytes" if version == "v1" else "memory.max"
        try:
            (path / limit_file).write_text(str(limit_bytes))
            if version == "v1" and (path / "memory.memsw.limit_in_bytes").exists():
                with contextlib.suppress(OSError):
                    (path / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
            else:
                with contextlib.suppress(OSError):
                    (path / "memory.swap.max").write_text("0")
        except OSError as exc:
            pytest.skip(f"cannot set a memory limit in {path}: {exc}")
        yield path
    finally:
        for _ in range(50):
            try:
                path.rmdir()
                break
            except OSError:
                import time
                time.sleep(0.1)


def run_in_cgroup(cgroup: Path, args: list, timeout: int = 600, env=None) -> subprocess.CompletedProcess:
    """Run `python -m streammerge ARGS` as a process placed in `cgroup` before it starts."""
    command = " ".join(shlex.quote(str(a)) for a in [sys.executable, "-m", "streammerge", *args])
    script = f"echo $$ > {shlex.quote(str(cgroup / 'cgroup.procs'))} && exec {command}"
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=timeout,
                          env=env or os.environ.copy())


def oom_killed(cgroup: Path, result: subprocess.CompletedProcess) -> bool:
    if result.returncode in (-9, 137):
        return True
    events = cgroup / "memory.events"
    if events.exists():
        return any(line.startswith("oom_kill ") and line.split()[1] != "0" for line in events.read_text().splitlines())
    return False


@contextlib.contextmanager
def confine_this_process(limit_bytes: int):
    """Run the body with this process in a fresh memory cgroup of `limit_bytes` (what it allocates from now on
    counts against the limit; going beyond it is an OOM kill, a loud failure). Yields False, and confines
    nothing, where no memory cgroup can be made or joined."""
    found = _own_memory_cgroup()
    if found is None:
        yield False
        return
    parent, version = found
    for stale in parent.glob("streammerge-confine-*"):  # left by a process the limit killed
        with contextlib.suppress(OSError):
            if not (stale / "cgroup.procs").read_text().strip():
                stale.rmdir()
    path = parent / f"streammerge-confine-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
    except OSError:
        yield False
        return
    joined = False
    try:
        try:
            limit_file = "memory.limit_in_bytes" if version == "v1" else "memory.max"
            (path / limit_file).write_text(str(limit_bytes))
            (path / "cgroup.procs").write_text(str(os.getpid()))
            joined = True
        except OSError:
            pass
        yield joined
    finally:
        if joined:
            with contextlib.suppress(OSError):
                (parent / "cgroup.procs").write_text(str(os.getpid()))
        with contextlib.suppress(OSError):
            path.rmdir()
