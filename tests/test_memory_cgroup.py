"""Inside a memory cgroup smaller than the budget, a merge is refused up front with numbers or completes within
the cgroup; it is never OOM-killed. Needs a writable memory cgroup (root); skipped elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cgroups import memory_cgroup, oom_killed, run_in_cgroup
from safetensors import safe_open
from safety_support import write_config

import synth

MB = 1000**2


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
    with memory_cgroup(limit) as cgroup:
        args = ["merge", config, "--report", report] + (["--max-ram", max_ram] if max_ram else [])
        result = run_in_cgroup(cgroup, args)
        assert not oom_killed(cgroup, result), f"OOM-killed: {result.returncode} {result.stderr}"
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
