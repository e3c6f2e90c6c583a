"""Helpers for the failure-behaviour tests: input snapshots, clean-failure assertions, small configs."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def snapshot(*paths) -> dict:
    """sha256, size and mtime of every file under `paths` (inputs must be identical after any failure)."""
    out = {}
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            st = f.stat()
            out[str(f)] = (hashlib.sha256(f.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
    return out


def listing(directory) -> list[str]:
    """Every entry under `directory`, hidden ones included, relative to it."""
    directory = Path(directory)
    if not directory.exists():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def write_config(path: Path, models, output, **extra) -> Path:
    data = {"output": str(output), "models": [{"path": str(m), **({"weight": w} if w is not None else {})}
                                              for m, w in models], **extra}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def assert_clean_failure(result, output: Path, *culprits: str, before_dir: list[str] | None = None,
                         inputs_before: dict | None = None, status: int | None = None) -> None:
    """Non-zero exit, a one-paragraph `streammerge: error:` message naming each culprit, no traceback, nothing
    at the output path, no debris beside it, and inputs untouched."""
    assert result.returncode != 0, result.stderr
    if status is not None:
        assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("streammerge: "), result.stderr
    for culprit in culprits:
        assert culprit in result.stderr, f"{culprit!r} not named in: {result.stderr}"
    output = Path(output)
    if before_dir is None:
        assert not output.exists(), listing(output)
        parent = output.parent
        debris = [p.name for p in parent.iterdir() if p.name.startswith(f".{output.name}")] if parent.exists() else []
        assert debris == [], debris
    else:
        assert listing(output) == before_dir
    if inputs_before is not None:
        assert snapshot(*[Path(p) for p in inputs_before]) == inputs_before


def start_merge(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "streammerge", "merge", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for(predicate, process: subprocess.Popen, timeout: float = 120.0, interval: float = 0.001) -> bool:
    """Poll until `predicate()` holds; False if the process ended first or the timeout passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return predicate()
        time.sleep(interval)
    return False


def freeze(process, timeout: float = 30.0) -> None:
    """SIGSTOP the process (a `Popen` or a `psutil.Process`) and wait until it has actually stopped (the signal
    is delivered asynchronously)."""
    process.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            state = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state in ("T", "t", "Z", "X"):
                return
        time.sleep(0.001)
    raise AssertionError(f"process {process.pid} did not stop")


def interrupt(process: subprocess.Popen, out: Path, signum: int, others=()) -> None:
    """Send `signum` to the run while it is stopped with its output in progress (and `others`, its workers, stopped
    too), then let it go on, before them: the signal is handled before the run takes another step, so the merge
    cannot end in between."""
    freeze(process)
    assert in_progress(out), "the merge ended before it could be interrupted"
    for other in others:
        freeze(other)
    process.send_signal(signum)
    for stopped in (process, *others):
        stopped.send_signal(signal.SIGCONT)


def done_shards(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob(".model-*.done"))


def in_progress(directory: Path) -> bool:
    """At least one shard complete and the index not written yet."""
    return bool(done_shards(directory)) and not (Path(directory) / "model.safetensors.index.json").exists()


def inode(path) -> int:
    return os.stat(path).st_ino


def run_main(*args) -> subprocess.CompletedProcess:
    """`streammerge ARGS` in this process (the command-line code path without interpreter start-up); an
    exception that escapes `main` fails the test, as a traceback would."""
    from streammerge.cli import main

    out, err = io.StringIO(), io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse
                code = exc.code
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
