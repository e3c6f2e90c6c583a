"""The command line as users and scripts call it: exit codes, messages, dry run, report."""

import gc
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
import yaml

from helpers import random_state_dict, save
from safety_support import run_main

import streammerge.cli
from streammerge.__main__ import command


def write_config(tmp_path, **overrides):
    paths = [save(random_state_dict(i), tmp_path / f"m{i}.safetensors") for i in range(2)]
    cfg = {"output": str(tmp_path / "out.safetensors"),
           "models": [{"path": str(paths[0]), "weight": 0.6}, {"path": str(paths[1]), "weight": 0.4}],
           "rules": [{"match": "*.num_batches_tracked", "take": 0}, {"match": "layer2.*", "drop": True}]}
    cfg.update(overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_clean_failure(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("streammerge: error: ")
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_merge_writes_output_summary_and_report(tmp_path, cli):
    config = write_config(tmp_path)
    result = cli("merge", config, "--report", tmp_path / "report.json")
    assert result.returncode == 0, result.stderr
    assert "merged 3 tensors" in result.stderr and "peak anonymous RAM" in result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tensors"] == 3
    assert report["read_bytes"] > 0 and report["written_bytes"] == (tmp_path / "out.safetensors").stat().st_size
    assert 0 < report["peak_anon_bytes"] <= report["max_ram_bytes"]
    assert {"seconds", "gb_per_s", "chunk_elements"} <= set(report)


def test_quiet_prints_nothing_and_output_flag_overrides(tmp_path, cli):
    config = write_config(tmp_path)
    result = cli("merge", config, "--quiet", "--output", tmp_path / "other.safetensors")
    assert result.returncode == 0 and result.stderr == "" and result.stdout == ""
    assert (tmp_path / "other.safetensors").exists() and not (tmp_path / "out.safetensors").exists()


def test_dry_run_describes_plan_without_writing(tmp_path, cli):
    config = write_config(tmp_path, output=str(tmp_path / "sharded"), shard_size="20KB")
    result = cli("merge", config, "--dry-run", "--max-ram", "512MiB")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    counts = {line.split(None, 1)[1]: int(line.split()[0]) for line in out.splitlines() if line.startswith("   ")}
    assert counts == {"default": 2, "*.num_batches_tracked -> take 0": 1, "layer2.* -> drop": 1}
    assert "shards:" in out and "estimated peak anonymous RAM" in out and "budget 512 MiB" in out
    assert not (tmp_path / "sharded").exists()


def test_python_dash_m_and_help(cli):
    result = cli("--help")
    assert result.returncode == 0 and "merge" in result.stdout
    result = cli("merge", "--help")
    assert "--max-ram" in result.stdout and "--dry-run" in result.stdout and "linear" in result.stdout


def test_the_command_ends_without_pythons_teardown_and_loses_no_output(tmp_path):
    """The `streammerge` command (console script and `python -m`) hands main's status straight to the operating
    system: Python's teardown (atexit handlers, then every module) is skipped, and what was printed still arrives
    through a pipe."""
    (installed,) = entry_points(group="console_scripts", name="streammerge")
    assert installed.value == "streammerge.__main__:command"
    script = ("import atexit, sys\n"
              "atexit.register(lambda: print('teardown ran', file=sys.stderr))\n"
              "sys.argv = ['streammerge', *sys.argv[1:]]\n"
              "from streammerge.__main__ import command\n"
              "command()\n")

    def run(*args):
        return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    done = run("merge", write_config(tmp_path), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "estimated peak anonymous RAM" in done.stdout and "teardown ran" not in done.stderr
    failed = run("merge", tmp_path / "missing.yaml")
    assert failed.returncode == 1 and failed.stderr.startswith("streammerge: error: ")
    assert "missing.yaml" in failed.stderr and "teardown ran" not in failed.stderr


def test_the_command_merges_with_the_garbage_collector_on(monkeypatch):
    """The collector is off only while the command's modules are imported."""
    class Exited(Exception):
        pass

    def exit_now(status):
        raise Exited(status)

    seen = []
    monkeypatch.setattr(streammerge.cli, "main", lambda: seen.append(gc.isenabled()) or 3)
    monkeypatch.setattr(os, "_exit", exit_now)
    try:
        with pytest.raises(Exited) as exited:
            command()
    finally:
        gc.unfreeze()
    assert seen == [True] and exited.value.args == (3,)


def test_user_errors_are_one_paragraph(tmp_path, cli):
    assert_clean_failure(cli("merge", tmp_path / "missing.yaml"), "missing.yaml")
    config = write_config(tmp_path, models=[{"path": str(tmp_path / "nope.safetensors")}])
    assert_clean_failure(cli("merge", config), "nope.safetensors", "no such file")
    # the same path through `main`, in-process, for the other kinds of error
    config = write_config(tmp_path, method="nonsense")
    assert_clean_failure(run_main("merge", config), "unknown merge method 'nonsense'")
    config = write_config(tmp_path, wieght=3)
    assert_clean_failure(run_main("merge", config), "unknown key 'wieght'")
    config = write_config(tmp_path)
    (tmp_path / "m1.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert_clean_failure(run_main("merge", config), "m1.safetensors", "not valid UTF-8 JSON")
    assert not (tmp_path / "out.safetensors").exists()


def test_budget_too_small_is_refused_with_the_smallest_that_works(tmp_path, cli):
    config = write_config(tmp_path)
    result = cli("merge", config, "--max-ram", "64MiB")
    assert_clean_failure(result, "too small", "smallest budget that works is")
    assert not (tmp_path / "out.safetensors").exists()
    result = cli("merge", config, "--max-ram", "100TB")
    assert_clean_failure(result, "available")


def test_bad_size_argument(tmp_path, cli):
    result = cli("merge", write_config(tmp_path), "--max-ram", "lots")
    assert result.returncode == 2 and "cannot read 'lots' as a size" in result.stderr


def test_dry_run_counts_the_statistics_passes_over_tensors_larger_than_a_chunk(tmp_path, cli):
    """ties over a 4-million-element tensor at a budget whose chunks are smaller: the dry run says what the
    statistics passes read again, as `input_reads` counts them (the distributed split uses the same count)."""
    from streammerge.config import load_config
    from streammerge.engine import input_reads, prepare
    from streammerge.units import parse_size
    g = torch.Generator().manual_seed(0)
    paths = [save({"big": torch.randn(2048, 2048, generator=g), "small": torch.randn(64, generator=g)},
                  tmp_path / f"m{i}.safetensors") for i in range(3)]
    config = tmp_path / "ties.yaml"
    config.write_text(yaml.safe_dump({
        "method": "ties", "base": str(paths[0]), "output": str(tmp_path / "out.safetensors"),
        "models": [{"path": str(p), "density": 0.5, "weight": 0.5} for p in paths[1:]]}))
    prepared = prepare(load_config(config), None, parse_size("4GiB"))
    try:
        plan = prepared.plan
        big = next(t for t in plan.tasks if t.name == "big")
        for budget, streamed in (("4GiB", False), ("256MiB", True)):
            result = cli("merge", config, "--dry-run", "--max-ram", budget)
            assert result.returncode == 0, result.stderr
            line = next(x for x in result.stdout.splitlines() if x.startswith("reads: "))
            chunk = int(line.split("chunk: ")[1].split()[0])
            reads = input_reads(prepared.config, big, chunk)
            assert (reads > 1) == streamed == (chunk < big.numel), (budget, chunk)
            if streamed:
                total = plan.read_bytes + (reads - 1) * big.read_bytes
                assert line.startswith(f"reads: {plan.read_bytes / 1e9:.2f} GB once, {total / 1e9:.2f} GB with the "
                                       f"statistics passes over the 1 tensor(s) larger than a chunk;"), line
            else:
                assert line.startswith(f"reads: {plan.read_bytes / 1e9:.2f} GB; chunk: "), line
    finally:
        prepared.close()
