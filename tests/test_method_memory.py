"""A merge allocates its chunk-sized buffers once (the workspace, which the budget counts); a method that makes
a chunk-sized temporary on the way (torch converts an operand of another dtype into a new tensor first, e.g. a
bool flag added to a float sum) takes a run beyond what its budget sized. torch's profiler lists every
allocation of a merge."""

from __future__ import annotations

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
