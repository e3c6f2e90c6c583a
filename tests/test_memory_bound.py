"""The RAM bound on full-size XTTS-v2-shaped checkpoints (3 x 1.87 GB): peak anonymous RSS stays within
max_ram, and the merge completes inside a memory cgroup far smaller than the inputs."""

import json
import math
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors import safe_open

import synth
from cgroups import memory_cgroup, oom_killed, run_in_cgroup

MIB = 1024**2
pytestmark = pytest.mark.big


@pytest.fixture(scope="module")
def xtts_models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("xtts")
    # The three models drawn at once (torch lets go of the GIL while it draws and writes): their 1.4 G random
    # values are most of this module's time.
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda seed: synth.write_models(directory, 1, "safetensors", shrink=1,
                                                              first_seed=seed)[0], range(3)))
    yield paths
    for p in paths:
        p.unlink()


def write_config(tmp_path: Path, models, max_ram: str, output: Path) -> Path:
    config = {"output": str(output), "max_ram": max_ram,
              "models": [{"path": str(p), "weight": w} for p, w in zip(models, [0.5, 0.3, 0.2])]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def anon_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def run_sampling_peak(args: list[str], timeout: float) -> tuple[int, str, int]:
    """Run a command; return its exit status, stderr and its peak anonymous RSS sampled every 5 ms."""
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, anon_of(proc.pid))
            except (OSError, psutil.Error):
                pass
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        done.set()
        sampler.join()
    return proc.returncode, stderr, peak


def check_some_tensors(models, output: Path):
    """Spot-check the largest and a few other tensors against an in-memory weighted sum."""
    with safe_open(output, "pt") as out:
        by_size = sorted(out.keys(), key=lambda n: math.prod(out.get_slice(n).get_shape()))
        handles = [safe_open(p, "pt") for p in models]
        for name in [by_size[-1], by_size[len(by_size) // 2], "gpt.mel_head.weight", "mel_stats"]:
            expected = sum(w * h.get_tensor(name).float() for w, h in zip([0.5, 0.3, 0.2], handles))
            torch.testing.assert_close(out.get_tensor(name), expected.to(out.get_tensor(name).dtype), msg=name)


def test_peak_anonymous_rss_within_256_mib(tmp_path, xtts_models):
    output = tmp_path / "merged.safetensors"
    config = write_config(tmp_path, xtts_models, "256MiB", output)
    returncode, stderr, peak = run_sampling_peak(
        [sys.executable, "-m", "streammerge", "merge", str(config), "--quiet", "--report", str(tmp_path / "report.json")],
        timeout=600)
    assert returncode == 0, stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert peak <= 256 * MIB, f"sampled peak {peak / MIB:.0f} MiB"
    assert report["peak_anon_bytes"] <= 256 * MIB
    assert output.stat().st_size > 1.8e9
    check_some_tensors(xtts_models, output)


def test_completes_inside_512_mib_cgroup(tmp_path, xtts_models):
    output = tmp_path / "merged.safetensors"
    config = write_config(tmp_path, xtts_models, "256MiB", output)
    with memory_cgroup(512 * MIB) as cgroup:
        result = run_in_cgroup(cgroup, ["merge", config, "--quiet", "--report", tmp_path / "report.json"])
        assert not oom_killed(cgroup, result), result.stderr
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["peak_anon_bytes"] <= 256 * MIB
    check_some_tensors(xtts_models, output)
