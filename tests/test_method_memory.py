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


def workspace_buffers(workspace, threshold: int) -> int:
    """How many of a workspace's buffers hold at least `threshold` bytes."""
    buffers = workspace.accs + workspace.scratch + [workspace.arena] + sum(workspace.outs.values(), [])
    buffers += [workspace.staging] if workspace.staging is not None else []
    return sum(b.numel() * b.element_size() >= threshold for b in buffers)


@pytest.mark.parametrize("method", sorted(m.name for m in methods()))
def test_a_merge_makes_no_chunk_sized_temporaries(tmp_path, models, method, monkeypatch):
    from streammerge import engine
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(streammerge_config(method, models, tmp_path / "o.safetensors", None, "1GiB")))
    prepared = prepare(load_config(config), None, 1 << 30)
    workspaces = []
    workspace = engine.Workspace
    monkeypatch.setattr(engine, "Workspace", lambda *a, **k: workspaces.append(workspace(*a, **k)) or workspaces[-1])
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            Engine(prepared, quiet=True).run()
    finally:
        prepared.close()
    threshold = 2 * ELEMENTS  # half the tensor, in float32 (the chunk holds it whole)
    large = [e.name for e in prof.events() if e.cpu_memory_usage >= threshold]
    assert set(large) == {"aten::empty"}, f"{method}: chunk-sized allocations by {sorted(set(large))}"
    assert len(large) == sum(workspace_buffers(w, threshold) for w in workspaces), f"{method}: {len(large)}"


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


# Methods whose streamed statistics are gathered in their buffers (a tensor of 4 chunks at most), with a chunk that
# makes each take its gathered path
GATHERED = {"ties": ELEMENTS // 2, "breadcrumbs": ELEMENTS // 2, "sce": ELEMENTS // 2,
            "arcee_fusion": ELEMENTS // 2}


@pytest.mark.parametrize("method", sorted(GATHERED))
def test_statistics_gathered_in_the_buffers_make_no_chunk_sized_temporaries(tmp_path, models, method, monkeypatch):
    """The whole tensor's magnitudes, variance or importances gathered in the method's buffers are selected there
    and any per-element result stored there too: no allocation as large as half a chunk but the workspace's."""
    from streammerge import engine
    from streammerge.methods import arcee_fusion, sce, sparsifiers
    chunk = GATHERED[method]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(streammerge_config(method, models, tmp_path / "o.safetensors", None, "1GiB")))
    prepared = prepare(load_config(config), None, 1 << 30)
    prepared.budget.chunk_elements = chunk
    gathered, workspaces = [], []
    # what runs only on the gathered path (`sparsifiers.gathering`: when it returns a Gathering)
    owner, name = {"ties": (sparsifiers, "gathering"), "breadcrumbs": (sparsifiers, "gathering"),
                   "sce": (sce.SceStats, "store_kept"),
                   "arcee_fusion": (arcee_fusion.RankSelect, "select_whole")}[method]
    original = getattr(owner, name)

    def counted(*args):
        result = original(*args)
        gathered.append(result is not None if owner is sparsifiers else True)
        return result

    monkeypatch.setattr(owner, name, counted)
    workspace = engine.Workspace
    monkeypatch.setattr(engine, "Workspace", lambda *a, **k: workspaces.append(workspace(*a, **k)) or workspaces[-1])
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            Engine(prepared, quiet=True, stats_in_memory=False).run()
    finally:
        prepared.close()
    assert any(gathered)
    threshold = 2 * chunk  # half the chunk, in float32
    large = [e.name for e in prof.events() if e.cpu_memory_usage >= threshold]
    assert set(large) == {"aten::empty"}, f"{method}: chunk-sized allocations by {sorted(set(large))}"
    assert len(large) == sum(workspace_buffers(w, threshold) for w in workspaces), f"{method}: {len(large)}"


LOADED_AT_BUDGET = """
import sys
from streammerge import engine
from streammerge.config import load_config
budget = engine.Budget
engine.Budget = lambda *a, **k: (print("numba" in sys.modules), budget(*a, **k))[1]
engine.prepare(load_config(sys.argv[1]), None, 1 << 30).close()
"""


@pytest.mark.parametrize("method, loads", [("dare_linear", True), ("della", True), ("dare_ties", True),
                                           ("ties", True), ("breadcrumbs_ties", True), ("breadcrumbs", True),
                                           ("task_arithmetic", True), ("linear", False)])
def test_compiled_kernels_are_loaded_before_the_budget_measures_the_process(tmp_path, models, method, loads):
    """The methods that merge on compiled kernels (random draws, selections by magnitude, task vectors summed in
    registers) load numba and those kernels (about 34 MiB of anonymous memory) before the budget measures what the
    process holds, so that the budget counts them; the others do not import it (a command's start-up does not pay
    for it)."""
    import subprocess
    import sys
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(streammerge_config(method, models, tmp_path / "o.safetensors", models[0],
                                                        "1GiB")))
    run = subprocess.run([sys.executable, "-c", LOADED_AT_BUDGET, str(config)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(loads)]


STREAMING_LOAD = """
import sys
from streammerge.cli import main
code = main(["merge", sys.argv[1], "--quiet", "--max-ram", sys.argv[2], "--report", sys.argv[3]])
print(code, "numba" in sys.modules)
"""


def test_breadcrumbs_streams_within_a_tight_budget_with_its_compiled_passes(tmp_path, cli):
    """`breadcrumbs` loads numba and its compiled merge and bracketing passes (34 MiB) before the budget measures
    the process, so a tensor streamed in chunks just above the smallest budget that works, or with room, stays
    within it; the same bytes as the tensor merged whole."""
    import subprocess
    import sys
    g = torch.Generator().manual_seed(5)
    base = torch.randn(4096, 1024, generator=g)  # 4 Mi elements: streamed below about 300 MiB
    paths = [tmp_path / f"{name}.safetensors" for name in ("base", "m0", "m1")]
    for path, tensor in zip(paths, (base, base + 0.01 * torch.randn(4096, 1024, generator=g),
                                    base + 0.01 * torch.randn(4096, 1024, generator=g))):
        save_file({"w": tensor}, path)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(streammerge_config("breadcrumbs", paths[1:], tmp_path / "o.safetensors",
                                                        paths[0])))
    too_small = cli("merge", config, "--max-ram", "64MiB", "--dry-run")
    smallest = int(float(re.search(r"smallest budget that works is ([0-9.]+) MiB", too_small.stderr).group(1)))
    outputs = {}
    for name, budget, streamed in (("tight", smallest + 24, True), ("room", smallest + 96, True),
                                   ("whole", 4096, False)):
        report = tmp_path / f"{name}.json"
        run = subprocess.run([sys.executable, "-c", STREAMING_LOAD, str(config), f"{budget}MiB", str(report)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["0", "True"], name
        facts = json.loads(report.read_text())
        assert (facts["chunk_elements"] < base.numel()) == streamed, name
        assert facts["peak_anon_bytes"] <= budget * 2**20, name
        outputs[name] = (tmp_path / "o.safetensors").read_bytes()
    assert outputs["tight"] == outputs["room"] == outputs["whole"]
