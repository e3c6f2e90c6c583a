"""RAM guard, disk-space check and progress bar."""

import fcntl
import os
import struct
import subprocess
import sys
import termios
import time

import pytest
import yaml

from helpers import random_state_dict, save
from streammerge.config import parse_config
from streammerge.engine import Engine, prepare
from streammerge.errors import MemoryBudgetError, OutputError
from streammerge.memory import Budget, MemoryGuard, anon_rss, available_memory


def config_for(tmp_path, **extra):
    paths = [save(random_state_dict(i, sizes=((512, 512),)), tmp_path / f"m{i}.safetensors") for i in range(2)]
    return parse_config({"output": str(tmp_path / "out.safetensors"),
                         "models": [{"path": str(p)} for p in paths], **extra})


def test_guard_flags_a_budget_overrun():
    guard = MemoryGuard(limit=anon_rss() + 64 * 2**20)
    with guard:
        guard.check("start")  # within budget
        ballast = bytearray(128 * 2**20)  # anonymous memory over the budget
        ballast[::4096] = b"x" * len(ballast[::4096])
        with pytest.raises(MemoryBudgetError, match="over the max_ram budget"):
            time.sleep(0.05)  # the sampler runs every few milliseconds
            guard.check("'some.tensor'")
        del ballast


def test_exceeding_the_budget_mid_run_stops_cleanly(tmp_path):
    prepared = prepare(config_for(tmp_path))
    prepared.budget.limit = anon_rss() // 2  # as if the process grew past its budget
    try:
        with pytest.raises(MemoryBudgetError, match=r"over the max_ram budget .* while processing 'layer0\."):
            Engine(prepared, quiet=True).run()
    finally:
        prepared.close()
    assert not (tmp_path / "out.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_budget_defaults_to_half_the_available_memory_at_most():
    """What the process holds, plus at most half of what the machine (or cgroup) can still give."""
    budget = Budget(None, per_element=24, default=1 << 60)
    assert budget.limit == budget.baseline + budget.available // 2
    assert budget.available <= available_memory() + 64 * 2**20  # the free memory moves a little meanwhile
    assert budget.chunk_elements >= 1


def test_budget_sizes_chunks_from_the_budget():
    small = Budget(anon_rss() + 100 * 2**20, per_element=24, default=0)
    large = Budget(anon_rss() + 300 * 2**20, per_element=24, default=0)
    assert small.chunk_elements < large.chunk_elements
    assert small.baseline + small.chunk_elements * 24 < small.limit


def test_not_enough_disk_space_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil

    from streammerge.io import outputs

    real = shutil.disk_usage
    monkeypatch.setattr(outputs.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=1000))
    prepared = prepare(config_for(tmp_path))
    try:
        with pytest.raises(OutputError, match="only 1000 B is free"):
            Engine(prepared, quiet=True).run()
    finally:
        prepared.close()
    assert not (tmp_path / "out.safetensors").exists()


def test_progress_bar_on_a_terminal(tmp_path):
    paths = [save(random_state_dict(i), tmp_path / f"m{i}.safetensors") for i in range(2)]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"output": str(tmp_path / "o.safetensors"),
                                   "models": [{"path": str(p)} for p in paths]}))
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen([sys.executable, "-m", "streammerge", "merge", str(cfg)], stderr=slave,
                            stdout=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert "merging" in text and "100%" in text and "B/s" in text
    assert "merged 4 tensors" in text


def test_buffers_are_no_larger_than_the_largest_tensor():
    from streammerge.memory import CHUNK_ALIGN

    roomy = Budget(anon_rss() + 900 * 2**20, per_element=24, default=0)
    small_model = Budget(anon_rss() + 900 * 2**20, per_element=24, default=0, largest_tensor=1000)
    assert small_model.chunk_elements < roomy.chunk_elements
    assert small_model.chunk_elements % CHUNK_ALIGN == 0 and small_model.chunk_elements >= 1000


def test_a_remeasured_budget_sizes_chunks_for_what_the_process_holds_now():
    """A long-lived worker (a Ray worker between tasks) holds more than when its job was planned: each task's
    chunks are sized again from what the process holds when it starts, under the same limit."""
    budget = Budget(anon_rss() + 512 * 1024**2, per_element=256, default=1 << 60)
    grown = bytearray(64 * 1024**2)
    grown[::4096] = b"\1" * len(grown[::4096])  # touched, so resident
    again = budget.remeasured()
    assert again.limit == budget.limit
    assert again.baseline >= budget.baseline + 60 * 1024**2
    assert again.chunk_elements < budget.chunk_elements
    assert again.estimated_peak <= again.limit
    del grown
