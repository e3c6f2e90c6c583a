"""`--report` is checked before anything is merged: a report that cannot be written, or that would replace or sit
inside the output, stops the run with nothing at the output path."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from safety_support import assert_clean_failure, write_config


@pytest.fixture
def setup(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.ones(4)}, a)
    save_file({"w": torch.zeros(4)}, b)
    return tmp_path, [(a, 0.5), (b, 0.5)]


@pytest.mark.parametrize("case", ["dev full", "directory", "missing parent", "read-only directory",
                                  "same as output", "inside directory output", "output given by --output"])
def test_unwritable_or_clashing_report_is_refused_before_merging(cli, setup, case):
    tmp_path, models = setup
    output = tmp_path / ("outdir" if case == "inside directory output" else "merged.safetensors")
    config = write_config(tmp_path / "c.yaml", models, output)
    extra = []
    if case == "dev full":
        report = "/dev/full"
    elif case == "directory":
        report = tmp_path / "reports"
        report.mkdir()
    elif case == "missing parent":
        report = tmp_path / "no" / "such" / "r.json"
    elif case == "read-only directory":
        if os.geteuid() == 0:
            pytest.skip("root can write into a read-only directory")
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        report = locked / "r.json"
    elif case == "same as output":
        report = output
    elif case == "inside directory output":
        report = output / "r.json"
    else:
        other = tmp_path / "other.safetensors"
        extra = ["--output", other]
        report, output = other, other
    result = cli("merge", config, "--report", report, "--quiet", *extra, timeout=300)
    assert_clean_failure(result, output, "--report")


def test_report_written_as_strict_json(cli, setup):
    tmp_path, models = setup
    output = tmp_path / "merged.safetensors"
    config = write_config(tmp_path / "c.yaml", models, output)
    result = cli("merge", config, "--report", tmp_path / "r.json", "--quiet", timeout=300)
    assert result.returncode == 0, result.stderr
    json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert torch.equal(load_file(output)["w"], torch.full((4,), 0.5))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".r.json")] == []
