"""Inside a memory cgroup smaller than the budget, a merge is refused up front with numbers or completes within
the cgroup; it is never OOM-killed. Needs a writable cgroup-v1 memory hierarchy (root); skipped elsewhere."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safety_support import write_config

import synth

MB = 1000**2
_serial = itertools.count()


def own_memory_cgroup() -> Path | None:
    """This process's cgroup-v1 memory directory, if there is one."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, relative = line.split(":", 2)
        if "memory" in controllers.split(","):
            directory = Path("/sys/fs/cgroup/memory") / relative.lstrip("/")
            return directory if (directory / "memory.limit_in_bytes").exists() else None
    return None


@contextlib.contextmanager
def child_cgroup(limit: int):
    parent = own_memory_cgroup()
    if parent is None:
        pytest.skip("no cgroup-v1 memory controller for this process")
    directory = parent / f"streammerge-test-{os.getpid()}-{next(_serial)}"
    try:
        directory.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup here ({exc.strerror})")
    try:
        (directory / "memory.limit_in_bytes").write_text(str(limit))
        yield directory
    finally:
        for _ in range(100):  # the child has exited; its cgroup may take a moment to empty
            try:
                directory.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def merge_in_cgroup(directory: Path, *args) -> subprocess.CompletedProcess:
    """Start the merge with its own pid already in the cgroup: a shell joins it, then execs Python."""
    script = 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"'
    return subprocess.run(["sh", "-c", script, "sh", str(directory), sys.executable, "-m", "streammerge", "merge",
                           *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three XTTS-shaped models of 117 MB each: together larger than the cgroups below."""
    return synth.write_models(tmp_path_factory.mktemp("models"), 3, "safetensors", shrink=4)


def check_merged(out: Path, models) -> None:
    """Every 40th tensor equals the reference average."""
    handles = [safe_open(str(m), "pt") for m in models]
    with safe_open(str(out), "pt") as merged:
        names = list(merged.keys())
        for name in names[::40]:
            tensors = [h.get_tensor(name) for h in handles]
            if tensors[0].is_floating_point():
                expected = sum(t * (1 / 3) for t in tensors).to(tensors[0].dtype)
                torch.testing.assert_close(merged.get_tensor(name), expected, rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(merged.get_tensor(name), tensors[0])


@pytest.mark.parametrize("limit, max_ram, must", [
    (400 * MB, None, "complete"),
    (300 * MB, None, "either"),
    (300 * MB, "2GiB", "refuse"),
    (300 * MB, "200MiB", "either"),
])
def test_merge_in_a_small_memory_cgroup(tmp_path, models, limit, max_ram, must):
    out, report = tmp_path / "merged.safetensors", tmp_path / "report.json"
    config = write_config(tmp_path / "m.yaml", [(m, 1) for m in models], out)
    with child_cgroup(limit) as cgroup:
        args = [config, "--report", report] + (["--max-ram", max_ram] if max_ram else [])
        result = merge_in_cgroup(cgroup, *args)
        failures = int((cgroup / "memory.failcnt").read_text())
    assert result.returncode not in (-9, 137), f"OOM-killed (limit hits: {failures}): {result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    if result.returncode == 0:
        assert must != "refuse", result.stderr
        data = json.loads(report.read_text())
        assert data["peak_anon_bytes"] <= data["max_ram_bytes"] < limit
        check_merged(out, models)
    else:
        assert must != "complete", result.stderr
        assert result.returncode == 1 and result.stderr.startswith("streammerge: error:"), result.stderr
        assert "MiB" in result.stderr and "max_ram" in result.stderr, result.stderr
        assert not out.exists()
