"""`scripts/time_merge.py`, which the README's in-process timings come from: it times the engine's statistics and
merge calls of a real merge, whose output it leaves as the merge makes it; and the bench's configs it is given."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml
from helpers import load_output, save

import time_merge
from streammerge import engine


def test_time_merge_times_the_engines_calls(tmp_path, monkeypatch, capsys):
    from streammerge.methods import streaming
    for name in time_merge.TIMED:  # (restored after the test: the script wraps them for its process)
        monkeypatch.setattr(engine.Engine, name, getattr(engine.Engine, name))
    monkeypatch.setattr(streaming.RankSelect, "select_whole", streaming.RankSelect.select_whole)
    monkeypatch.setattr(time_merge, "SECONDS", time_merge.SECONDS.__class__())
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(300, 700, generator=g), "v": torch.randn(5000, generator=g)}
    models = [{n: t + torch.randn(t.shape, generator=g) * 0.1 for n, t in base.items()} for _ in range(2)]
    config = {"method": "ties", "base": str(save(base, tmp_path / "base.safetensors")),
              "models": [{"path": str(save(m, tmp_path / f"m{k}.safetensors")), "density": 0.5}
                         for k, m in enumerate(models)],
              "output": str(tmp_path / "out.safetensors")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert time_merge.main([str(tmp_path / "c.yaml"), "--max-ram", "1GiB",
                            "--time", "streammerge.methods.streaming:RankSelect.select_whole"]) == 0
    printed = dict((label, float(value)) for value, label in
                   re.findall(r"^\s*([0-9.]+) s  (.+)$", capsys.readouterr().out, re.M))
    assert set(printed) == {"statistics (tensors held whole)", "merge", "the whole command, from the CLI's start",
                            "RankSelect.select_whole"}
    seconds = time_merge.SECONDS
    assert 0 < seconds["merge"] < seconds["the whole command, from the CLI's start"]
    assert 0 < seconds["RankSelect.select_whole"] < seconds["statistics (tensors held whole)"]
    assert all(printed[label] == round(seconds[label], 2) for label in printed)
    assert set(load_output(tmp_path / "out.safetensors")) == {"w", "v"}


def test_time_merge_sums_the_tensors_merged_on_their_own_by_shape(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engine.Engine, "run_task", engine.Engine.run_task)  # (restored: the script wraps it)
    for name in time_merge.TIMED:
        monkeypatch.setattr(engine.Engine, name, getattr(engine.Engine, name))
    monkeypatch.setattr(time_merge, "SECONDS", time_merge.SECONDS.__class__())
    monkeypatch.setattr(time_merge, "TENSORS", time_merge.TENSORS.__class__())
    g = torch.Generator().manual_seed(1)
    models = [{"w": torch.randn(300, 700, generator=g), "u": torch.randn(300, 700, generator=g),
               "a": torch.randn(5000, generator=g), "b": torch.randn(64, generator=g)} for _ in range(2)]
    config = {"method": "linear", "models": [{"path": str(save(m, tmp_path / f"m{k}.safetensors")), "weight": 1.0}
                                             for k, m in enumerate(models)],
              "output": str(tmp_path / "out.safetensors")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert time_merge.main([str(tmp_path / "c.yaml"), "--by-shape"]) == 0
    out = capsys.readouterr().out
    # the two large tensors on their own, under one label; the two small ones merged together, in one run
    assert re.search(r"^\s*[0-9.]+ s  tensors of shape \[300, 700\] \(2\)$", out, re.M), out
    assert dict(time_merge.TENSORS) == {"tensors of shape [300, 700]": 2}
    seconds = time_merge.SECONDS
    assert 0 < seconds["tensors of shape [300, 700]"] < seconds["the whole command, from the CLI's start"]
    assert set(load_output(tmp_path / "out.safetensors")) == {"w", "u", "a", "b"}


def test_bench_writes_the_config_of_each_row_and_runs_nothing(tmp_path, monkeypatch, capsys):
    """`scripts/bench.py --configs DIR`: the config of every (set, method, budget) row as the bench runs it, with
    absolute paths (given relative ones), for time_merge.py to time one row; no merge is run."""
    import bench

    monkeypatch.chdir(tmp_path)
    assert bench.main(["--data", "data", "--shapes", "xtts", "--xtts-shrink", "64", "--methods", "linear,ties",
                       "--budgets", "4GiB,256MiB", "--configs", "configs"]) == 0
    configs = tmp_path / "configs"
    written = [configs / f"xtts-{m}-{b}.yaml" for m in ("linear", "ties") for b in ("4GiB", "256MiB")]
    assert capsys.readouterr().out.split() == [str(p) for p in written]
    assert sorted(configs.iterdir()) == sorted(written)
    models, base, _ = bench.bench_set("xtts", tmp_path / "data", 64)
    config = yaml.safe_load((configs / "xtts-ties-256MiB.yaml").read_text())
    assert config == bench.streammerge_config("ties", models, configs / "xtts-ties-256MiB.safetensors", base, "256MiB")
    assert all(Path(m["path"]).is_absolute() and Path(m["path"]).exists() for m in config["models"])
