"""A merge allocates its chunk-sized buffers once (the workspace, which the budget counts); a method that makes
a chunk-sized temporary on the way (torch converts an operand of another dtype into a new tensor first, e.g. a
bool flag added to a float sum) takes a run beyond what its budget sized. torch's profiler lists every
allocation of a merge."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch.profiler import ProfilerActivity, profile

from bench import streammerge_config
from streammerge.config import load_config
from streammerge.engine import Engine, prepare
from streammerge.methods.registry import methods

ELEMENTS = 1 << 20  # one chunk: 4 MiB in float32; histograms (65,536 bins of int64) are 0.5 MiB


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models")
    paths = []
    for seed in range(3):
        path = directory / f"m{seed}.safetensors"
        weights = torch.randn(256, ELEMENTS // 256, generator=torch.Generator().manual_seed(seed))
        save_file({"w": weights}, path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("method", sorted(m.name for m in methods()))
def test_a_merge_makes_no_chunk_sized_temporaries(tmp_path, models, method):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(streammerge_config(method, models, tmp_path / "o.safetensors", None, "1GiB")))
    prepared = prepare(load_config(config), None, 1 << 30)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            Engine(prepared, quiet=True).run()
    finally:
        prepared.close()
    large = sorted({e.name for e in prof.events() if e.cpu_memory_usage >= 2 * ELEMENTS})  # half the chunk
    assert large == ["aten::empty"], f"{method}: chunk-sized allocations by {large} beyond the workspace's"


ROWS = 1 << 22  # rows of two elements: 32 MiB a model in float32, and 4 million rows of statistics


@pytest.fixture(scope="module")
def many_rows(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rows")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(ROWS, 2, generator=g)
    save_file({"w": base}, directory / "base.safetensors")
    for i in range(2):
        save_file({"w": base + 0.01 * torch.randn(ROWS, 2, generator=g)}, directory / f"m{i}.safetensors")
    return directory


@pytest.mark.parametrize("method, parameters", [("arcee_fusion", {}), ("nuslerp", {"nuslerp_flatten": False}),
                                                ("model_stock", {"filter_wise": True})])
def test_per_row_statistics_are_counted_in_the_budget(tmp_path, many_rows, cli, method, parameters):
    """A method with statistics per row keeps them for the whole tensor until it is merged (for 4 million rows,
    100-180 MiB beyond the chunk buffers): the budget reserves them, so the chunks shrink to leave them room and
    the merge stays within the smallest budget the command says works, plus 48 MiB. Without the reserve, chunks
    took that room too and the run crossed the budget (the guard stops it)."""
    models = [many_rows / f"m{i}.safetensors" for i in range(1 if method == "arcee_fusion" else 2)]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"method": method, "base": str(many_rows / "base.safetensors"),
                                      "models": [{"path": str(p)} for p in models], "parameters": parameters,
                                      "output": str(tmp_path / "out.safetensors")}))
    too_small = cli("merge", config, "--max-ram", "64MiB", "--dry-run")
    assert too_small.returncode != 0
    assert "statistics of its largest tensor" in too_small.stderr
    smallest = re.search(r"smallest budget that works is ([0-9.]+) MiB", too_small.stderr)
    budget = int(float(smallest.group(1))) + 48
    run = cli("merge", config, "--max-ram", f"{budget}MiB", "--report", tmp_path / "r.json")
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["peak_anon_bytes"] <= budget * 2**20
    assert report["chunk_elements"] < 2 * ROWS  # (the tensor did not fit one chunk beside its statistics)
