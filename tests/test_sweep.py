"""`streammerge sweep`: variants from a grid and a list, each merged into its own output and scored; results in
sweep.csv / sweep.json; a rerun skips what is complete; --dry-run lists the variants."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import load_output, save
from safety_support import run_main

from streammerge.errors import ConfigError
from streammerge.sweep import load_sweep, set_path, variant_name

# The sum of the float32 tensor "w", read from the safetensors layout directly: a scorer that does not pay for
# importing torch on every variant.
SCORE = """import array, json, math, struct, sys
with open(sys.argv[1], "rb") as f:
    size = struct.unpack("<Q", f.read(8))[0]
    entry = json.loads(f.read(size))["w"]
    assert entry["dtype"] == "F32" and sys.byteorder == "little", entry
    start, end = entry["data_offsets"]
    f.seek(8 + size + start)
    values = array.array("f", f.read(end - start))
print("scoring", sys.argv[1])
print(math.fsum(values))
"""


def make_models(tmp: Path):
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(300, 200, generator=g), "b": torch.randn(200, generator=g)}
    tunes = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    return [save(m, tmp / f"m{i}.safetensors") for i, m in enumerate(tunes)], save(base, tmp / "base.safetensors")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("sweep-models"))


def sweep_file(tmp: Path, models, evaluate: str | None = None, **extra) -> Path:
    paths, base = models
    (tmp / "score.py").write_text(SCORE)
    base_config = {"method": "ties", "base": str(base), "output": "merged.safetensors",
                   "models": [{"path": str(paths[0]), "weight": 0.5, "density": 0.5},
                              {"path": str(paths[1]), "weight": 0.5, "density": 0.5}]}
    (tmp / "base.yaml").write_text(yaml.safe_dump(base_config))
    data = {"base_config": str(tmp / "base.yaml"), "output_dir": str(tmp / "sweep"),
            "grid": {"models.1.weight": [0.2, 0.5, 0.8], "method": ["ties", "dare_ties"]}, **extra}
    if evaluate is not None:
        data["evaluate"] = evaluate
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "streammerge", *map(str, args)], capture_output=True, text=True,
                          timeout=900, cwd=cwd)


def expected_score(output: Path) -> float:
    return float(load_output(output)["w"].double().sum())


def test_sweep_runs_scores_and_skips_finished_variants(tmp_path, models):
    path = sweep_file(tmp_path, models, f"{sys.executable} {tmp_path / 'score.py'} {{output}}")
    listed = run_main("sweep", path, "--dry-run")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count("pending") == 6 and not (tmp_path / "sweep").exists()

    first = run("sweep", path)
    assert first.returncode == 0, first.stderr
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["results"]
    assert [r["variant"] for r in rows] == list(range(6)) and {r["status"] for r in rows} == {"merged"}
    for r in rows:
        assert r["score"] == pytest.approx(expected_score(Path(r["output"])), rel=1e-9)
        assert r["seconds"] > 0 and r["peak_ram_bytes"] > 0 and r["error"] == ""
    assert rows[0]["values"] == {"models.1.weight": 0.2, "method": "ties"}
    assert Path(rows[0]["output"]).name == "000-weight=0.2-method=ties.safetensors"
    # the printed table is sorted by score, best (highest) first
    printed = [line.split()[-1] for line in first.stdout.splitlines()[1:]]
    assert printed == [r["name"] for r in sorted(rows, key=lambda r: -r["score"])]
    with open(tmp_path / "sweep" / "sweep.csv", newline="") as f:
        assert [float(r["score"]) for r in csv.DictReader(f)] == [r["score"] for r in rows]

    # weights differ between variants, methods too: the outputs are not all the same
    assert len({r["score"] for r in rows}) == 6

    before = {r["output"]: Path(r["output"]).stat().st_mtime_ns for r in rows}
    (Path(rows[4]["output"])).unlink()  # one output gone: only that one is merged again
    second = run_main("sweep", path)  # the first run was the real command
    assert second.returncode == 0, second.stderr
    again = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["results"]
    assert [r["status"] for r in again] == ["reused"] * 4 + ["merged", "reused"]
    assert [r["score"] for r in again] == [r["score"] for r in rows]
    for r in again:
        if r["variant"] != 4:
            assert Path(r["output"]).stat().st_mtime_ns == before[r["output"]]
    assert "done" in run_main("sweep", path, "--dry-run").stdout


def test_evaluate_failures_are_recorded_not_fatal(tmp_path, models):
    (tmp_path / "flaky.py").write_text(
        "import sys\nif '001-' in sys.argv[1]: sys.exit('no score for this one')\nprint('not a number')\n")
    path = sweep_file(tmp_path, models, f"{sys.executable} {tmp_path / 'flaky.py'} {{output}}",
                      grid={"models.1.weight": [0.2, 0.5]})
    result = run_main("sweep", path)
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["results"]
    assert rows[0]["score"] is None and "no number" in rows[0]["error"]
    assert rows[1]["score"] is None and "status 1" in rows[1]["error"] and "no score for this one" in rows[1]["error"]
    assert all(Path(r["output"]).exists() for r in rows)


def test_inline_config_and_explicit_variants(tmp_path, models):
    paths, _ = models
    data = {"config": {"models": [str(p) for p in paths], "output": "x.safetensors"},
            "output_dir": str(tmp_path / "out"), "variants": [{"models.0.weight": 3}, {"models.1.weight": 3}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    sweep = load_sweep(tmp_path / "s.yaml")
    assert [v.config.models[0].params["weight"] for v in sweep.variants] == [3, 1.0]
    result = run_main("sweep", tmp_path / "s.yaml", "--quiet")
    assert result.returncode == 0, result.stderr
    a, b = (load_output(v.output)["w"] for v in sweep.variants)
    m0, m1 = (load_output(p)["w"] for p in paths)
    torch.testing.assert_close(a, (3 * m0 + m1) / 4)
    torch.testing.assert_close(b, (m0 + 3 * m1) / 4)


@pytest.mark.parametrize("data, fragment", [
    ({"output_dir": "o", "grid": {"method": ["linear"]}}, "either as 'base_config"),
    ({"config": {"models": ["a"]}, "grid": {"method": ["linear"]}}, "'output_dir' is missing"),
    ({"config": {"models": ["a"]}, "output_dir": "o"}, "nothing to sweep"),
    ({"config": {"models": ["a"]}, "output_dir": "o", "grid": {"method": "linear"}}, "non-empty lists"),
    ({"config": {"models": ["a"]}, "output_dir": "o", "grid": {"method": ["nope"]}}, "variant 0"),
    ({"config": {"models": ["a"]}, "output_dir": "o", "grid": {"models.3.weight": [1]}}, "not an index"),
    ({"config": {"models": ["a"]}, "output_dir": "o", "grid": {"method": ["linear"]}, "evaluate": "x"}, "{output}"),
    ({"config": {"models": ["a"]}, "output_dir": "o", "grid": {"method": ["linear"]}, "extra": 1}, "unknown key"),
])
def test_bad_sweep_files_are_refused(tmp_path, data, fragment):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=None) as info:
        load_sweep(tmp_path / "s.yaml")
    assert fragment in str(info.value)


def test_paths_and_names():
    data = {"models": ["a.pth", {"path": "b.pth"}]}
    set_path(data, "models.0.weight", 0.3)
    set_path(data, "parameters.lambda", 2)
    assert data == {"models": [{"path": "a.pth", "weight": 0.3}, {"path": "b.pth"}], "parameters": {"lambda": 2}}
    assert variant_name(7, {"models.1.weight": 0.5, "method": "dare_ties"}) == "007-weight=0.5-method=dare_ties"
