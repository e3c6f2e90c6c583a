"""Failures after the inputs were accepted: NaN/Inf, refused weights, outputs that are inputs, interrupts and full
disks. Each leaves no file at the output path, no temporary debris, and the inputs byte-for-byte unchanged."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from safety_support import (assert_clean_failure, freeze, in_progress, interrupt, listing, run_main, snapshot,
                            start_merge, wait_for, write_config)

import synth
from streammerge.config import parse_config
from streammerge.engine import merge
from streammerge.errors import OutputError


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three shrunk XTTS-shaped safetensors models (about 7.5 MB each)."""
    return synth.write_models(tmp_path_factory.mktemp("models"), 3, "safetensors", shrink=16)


@pytest.fixture(scope="module")
def larger_models(tmp_path_factory):
    """Three XTTS-shaped models of about 30 MB each: a merge long enough to interrupt."""
    return synth.write_models(tmp_path_factory.mktemp("larger"), 3, "safetensors", shrink=8)


# -- NaN / Inf --------------------------------------------------------------------------------------------

@pytest.fixture
def nan_models(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    bad = torch.randn(300, 300)
    bad[123, 45] = float("nan")
    save_file({"fine": torch.randn(1000), "layer.weight": torch.randn(300, 300)}, a)
    save_file({"fine": torch.randn(1000), "layer.weight": bad}, b)
    return a, b


def test_nan_in_an_input_stops_naming_tensor_and_file(cli, tmp_path, nan_models):
    a, b = nan_models
    out = tmp_path / "merged.safetensors"
    config = write_config(tmp_path / "m.yaml", [(a, 1), (b, 1)], out)
    before = snapshot(a, b)
    result = cli("merge", config)
    assert_clean_failure(result, out, "'layer.weight'", str(b), "NaN", "--allow-nonfinite", inputs_before=before,
                         status=1)
    assert str(a) not in result.stderr  # only the input that holds them is named


def test_allow_nonfinite_writes_and_lists_them(tmp_path, nan_models):
    a, b = nan_models
    out, report = tmp_path / "merged.safetensors", tmp_path / "report.json"
    config = write_config(tmp_path / "m.yaml", [(a, 1), (b, 1)], out)
    result = run_main("merge", config, "--allow-nonfinite", "--report", report)
    assert result.returncode == 0, result.stderr
    assert json.loads(report.read_text())["nonfinite_tensors"] == ["layer.weight"]
    assert "NaN/Inf in 1 tensor(s): layer.weight" in result.stderr
    merged = load_file(out)
    assert torch.isnan(merged["layer.weight"][123, 45]) and torch.isfinite(merged["fine"]).all()


def test_overflow_in_the_merge_itself_is_explained(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"big": torch.full((10,), 3e38)}, a)
    save_file({"big": torch.full((10,), 3e38)}, b)
    out = tmp_path / "merged.safetensors"
    config = write_config(tmp_path / "m.yaml", [(a, 1), (b, 1)], out, normalize=False)
    assert_clean_failure(run_main("merge", config), out, "'big'", "inputs are finite", "float64")


# -- weights refused up front ------------------------------------------------------------------------------

@pytest.mark.parametrize("weights, extra, fragment", [
    ([0.5, -0.5], {}, "sum to zero"),
    ([0.0, 0.0], {}, "sum to zero"),
    ([1.5, -0.5], {}, "negative weight"),
    ([1, 1], {"rules": [{"match": "*", "weights": [1, -1]}]}, "sum to zero"),
    ([1, 1], {"rules": [{"match": "*", "take": 2}]}, "take: 2 is not a model index"),
    ([1, 1], {"rules": [{"match": "*", "take": -1}]}, "is not a model index"),
    ([1, 1], {"rules": [{"match": "*", "weights": [1]}]}, "a list of 2 numbers"),
])
def test_bad_weights_are_refused_before_anything_is_written(tmp_path, models, weights, extra, fragment):
    out = tmp_path / "new" / "merged"
    config = write_config(tmp_path / "m.yaml", list(zip(models[:2], weights)), out, **extra)
    assert_clean_failure(run_main("merge", config), out, fragment, str(config), status=1)
    assert not out.parent.exists()


def test_zero_weight_sum_through_the_command(cli, tmp_path, models):
    out = tmp_path / "merged.safetensors"
    config = write_config(tmp_path / "m.yaml", list(zip(models[:3], [1, -0.5, -0.5])), out)
    assert_clean_failure(cli("merge", config), out, "sum to zero", str(config), inputs_before=snapshot(*models),
                         status=1)


def test_negative_weights_are_accepted_without_normalize(tmp_path, models):
    out = tmp_path / "merged.safetensors"
    config = write_config(tmp_path / "m.yaml", list(zip(models[:2], [1.5, -0.5])), out, normalize=False)
    result = run_main("merge", config, "--quiet")
    assert result.returncode == 0, result.stderr
    a, b, merged = load_file(models[0]), load_file(models[1]), load_file(out)
    name = "gpt.gpt.h.0.attn.c_attn.weight"
    assert torch.equal(merged[name], a[name] * 1.5 + b[name] * -0.5)


# -- the output is never an input --------------------------------------------------------------------------

def _refused_output(run, tmp_path, models, out, *fragments, report=None):
    inputs = [Path(m) for m in models[:2]]
    config = write_config(tmp_path / "m.yaml", [(m, 1) for m in inputs], out)
    before, dir_before = snapshot(*inputs), listing(tmp_path)
    args = ["merge", config] + (["--report", report] if report else [])
    result = run(*args)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert snapshot(*inputs) == before
    assert listing(tmp_path) == dir_before  # nothing created or removed
    return result


@pytest.fixture
def local_models(tmp_path, models):
    """Copies of two models inside tmp_path, so links and output directories can be placed around them."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    copies = []
    for m in models[:2]:
        copies.append(inputs / Path(m).name)
        copies[-1].write_bytes(Path(m).read_bytes())
    return copies


def _odd_output(tmp_path: Path, case: str) -> tuple[Path, str]:
    """An output path that cannot hold the output, and the part of it the message must name."""
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir.safetensors").mkdir()
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(tmp_path / "fifo")
    return {
        "dev_null": (Path("/dev/null"), "'/dev/null' is a character device"),
        "dev_null_parent": (Path("/dev/null/merged.pth"), "'/dev/null' is a character device, not a directory"),
        "file_as_directory": (tmp_path / "a_file", "is an existing file, not a directory"),
        "file_as_parent": (tmp_path / "a_file" / "out.safetensors", f"'{tmp_path / 'a_file'}' is a regular file, not a directory"),
        "file_as_grandparent": (tmp_path / "a_file" / "x" / "out", f"'{tmp_path / 'a_file'}' is a regular file"),
        "directory_as_file": (tmp_path / "a_dir.safetensors", "is an existing directory; a safetensors file is one file"),
        "symlink_loop": (tmp_path / "loop1", f"'{tmp_path / 'loop1'}' is a symbolic link loop"),
        "symlink_loop_parent": (tmp_path / "loop2" / "sub" / "merged.pth", f"'{tmp_path / 'loop2'}' is a symbolic link loop"),
        "dangling_symlink": (tmp_path / "dangling" / "merged.safetensors", f"'{tmp_path / 'dangling'}' is a symbolic link to"),
        "fifo": (tmp_path / "fifo", "is a pipe"),
    }[case]


@pytest.mark.parametrize("case", ["dev_null", "dev_null_parent", "file_as_directory", "file_as_parent",
                                  "file_as_grandparent", "directory_as_file", "symlink_loop", "symlink_loop_parent",
                                  "dangling_symlink", "fifo"])
def test_unusable_output_paths_are_named(tmp_path, local_models, case):
    """One paragraph naming the output and the part of its path at fault (never a message about an interrupted
    merge's manifest), before anything is created; --dry-run checks the same."""
    out, fragment = _odd_output(tmp_path, case)
    for dry_run in ([], ["--dry-run"]):
        config = write_config(tmp_path / "m.yaml", [(m, 1) for m in local_models], out)
        before = listing(tmp_path)
        result = run_main("merge", config, *dry_run)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith(f"streammerge: error: output '{out}'") and fragment in result.stderr, \
            result.stderr
        assert "manifest" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert listing(tmp_path) == before


def test_output_equal_to_an_input(cli, tmp_path, local_models):  # through a real process
    _refused_output(cli, tmp_path, local_models, local_models[1], "is the input", str(local_models[1]))


def test_output_is_a_symlink_to_an_input(tmp_path, local_models):
    link = tmp_path / "link.safetensors"
    link.symlink_to(local_models[0])
    _refused_output(run_main, tmp_path, local_models, link, str(local_models[0]))


def test_output_is_a_hard_link_to_an_input(tmp_path, local_models):
    link = tmp_path / "hard.safetensors"
    os.link(local_models[0], link)
    _refused_output(run_main, tmp_path, local_models, link, "is the same file as", str(local_models[0]))


def test_output_directory_holds_an_input(tmp_path, local_models):
    _refused_output(run_main, tmp_path, local_models, local_models[0].parent, "holds the input")


def test_output_directory_reached_through_a_symlink(tmp_path, local_models):
    (tmp_path / "alias").symlink_to(local_models[0].parent, target_is_directory=True)
    _refused_output(run_main, tmp_path, local_models, tmp_path / "alias", "holds the input")


def test_output_shard_name_hard_linked_to_an_input(tmp_path, local_models):
    out = tmp_path / "out"
    out.mkdir()
    os.link(local_models[1], out / "model.safetensors")
    _refused_output(run_main, tmp_path, local_models, out, "is the same file as", str(local_models[1]))


def test_report_path_equal_to_an_input(tmp_path, local_models):
    _refused_output(run_main, tmp_path, local_models, tmp_path / "merged.safetensors", "report", str(local_models[0]),
                    report=local_models[0])


def test_output_equal_to_the_config(tmp_path, local_models):
    _refused_output(run_main, tmp_path, local_models, tmp_path / "m.yaml", "m.yaml")


# -- interrupts ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum, status, word", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_signal_mid_merge_removes_everything(tmp_path, larger_models, signum, status, word):
    out = tmp_path / "out"
    config = write_config(tmp_path / "m.yaml", [(m, 1) for m in larger_models], out, shard_size="1MB")
    before = snapshot(*larger_models)
    process = start_merge(config, "--quiet")
    try:
        assert wait_for(lambda: in_progress(out), process), "the merge ended before it could be interrupted"
        interrupt(process, out, signum)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == status, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr and word in stderr, stderr
    assert not out.exists(), listing(out)
    assert listing(tmp_path) == ["m.yaml"]
    assert snapshot(*larger_models) == before


def test_an_interrupted_run_removes_only_what_it_created(tmp_path, larger_models):
    """The run creates newparent/out/; meanwhile another run finishes newparent/b.safetensors and the user copies
    notes into newparent/out/. Ctrl-C removes the run's own files and leaves theirs, with their directories."""
    out = tmp_path / "newparent" / "out"
    config = write_config(tmp_path / "m.yaml", [(m, 1) for m in larger_models], out, shard_size="1MB")
    process = start_merge(config, "--quiet")
    try:
        assert wait_for(lambda: in_progress(out), process), "the merge ended before it could be interrupted"
        freeze(process)  # the files appear while the run is still going
        (tmp_path / "newparent" / "b.safetensors").write_bytes(b"another run's finished output")
        (out / "notes.txt").write_text("copied here by the user")
        interrupt(process, out, signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert listing(tmp_path) == ["m.yaml", "newparent", "newparent/b.safetensors", "newparent/out",
                                 "newparent/out/notes.txt"]
    assert (tmp_path / "newparent" / "b.safetensors").read_bytes() == b"another run's finished output"


@pytest.mark.parametrize("output_name", ["merged.safetensors", "sharded", "merged.pth"])
def test_a_failed_run_keeps_files_others_put_in_directories_it_created(tmp_path, models, monkeypatch, output_name):
    """A write fails after others have put files into the directories this run created (beside the output,
    and inside a directory output): those files and their directories stay; empty ones the run made go."""
    import streammerge.io.safetensors_io as st

    real_pwrite, calls = os.pwrite, [0]
    out = tmp_path / "a" / "b" / output_name
    others = [tmp_path / "a" / "other.safetensors", tmp_path / "a" / "b" / "c" / "kept.txt"]
    if output_name == "sharded":
        others.append(out / "README.txt")

    def pwrite_then_fail(fd, data, position):
        calls[0] += 1
        if calls[0] == 3:
            for path in others:
                path.parent.mkdir(exist_ok=True)
                path.write_text("someone else's")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, position)

    monkeypatch.setattr(st.os, "pwrite", pwrite_then_fail)
    config = parse_config({"models": [str(m) for m in models[:2]], "output": str(out), "shard_size": "1MB"})
    with pytest.raises(OutputError, match="No space left on device"):
        merge(config, quiet=True)
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(others)
    assert all(p.read_text() == "someone else's" for p in others)
    assert out.exists() == (output_name == "sharded")


def test_signal_while_writing_a_single_file(tmp_path, larger_models):
    out = tmp_path / "merged.safetensors"
    config = write_config(tmp_path / "m.yaml", [(m, 1) for m in larger_models], out)
    process = start_merge(config, "--quiet", "--max-ram", "200MiB")
    try:
        started = wait_for(lambda: any(p.name.startswith(".merged") for p in tmp_path.iterdir()), process)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    if started and process.returncode == 0:
        pytest.skip("the merge finished before the signal arrived")
    assert process.returncode == 130, stderr
    assert listing(tmp_path) == ["m.yaml"]


# -- full disks ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(directory: Path, options: str):
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'not permitted'})")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def test_output_larger_than_the_disk_is_refused_up_front(tmp_path, models):
    with tmpfs(tmp_path / "disk", "size=2m") as disk:
        out = disk / "merged.safetensors"
        config = write_config(tmp_path / "m.yaml", [(m, 1) for m in models], out)
        before = snapshot(*models)
        result = run_main("merge", config)
        assert_clean_failure(result, out, str(out), "MiB is free", inputs_before=before, status=1)
        assert listing(disk) == []


def test_disk_that_fills_mid_write(cli, tmp_path):
    """A 2 MB disk with exactly the room the output's bytes need: the free-space check passes, but files take
    whole pages and the manifest and index need some too, so the disk fills part-way through the write."""
    inputs = []
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        inputs.append(tmp_path / f"in{seed}.safetensors")
        save_file({f"layer{i}.weight": torch.randn(250, 203, generator=gen) for i in range(6)}, inputs[-1])
    config = write_config(tmp_path / "m.yaml", [(m, 1) for m in inputs], tmp_path / "probe", shard_size="250KB")
    assert run_main("merge", config, "--quiet").returncode == 0
    shards = sorted((tmp_path / "probe").glob("model-*.safetensors"))
    total = sum(f.stat().st_size for f in shards)
    assert len(shards) == 6
    with tmpfs(tmp_path / "disk", "size=2m") as disk:
        out = disk / "out"
        config = write_config(tmp_path / "m.yaml", [(m, 1) for m in inputs], out, shard_size="250KB")
        free = shutil.disk_usage(disk).free
        with open(disk / "filler", "wb") as filler:
            filler.write(b"\0" * (free - -(-total // 4096) * 4096))
        assert total <= shutil.disk_usage(disk).free < total + 4096
        before = snapshot(*inputs)
        result = cli("merge", config)
        assert_clean_failure(result, out, str(out), "No space left on device", inputs_before=before, status=1)
        assert listing(disk) == ["filler"]


def test_inodes_run_out_mid_write(tmp_path, models):
    """The first shard is written, the second cannot even be created (ENOSPC from open)."""
    with tmpfs(tmp_path / "disk", "size=64m,nr_inodes=4") as disk:
        out = disk / "out"
        config = write_config(tmp_path / "m.yaml", [(m, 1) for m in models], out, shard_size="1MB")
        before = snapshot(*models)
        result = run_main("merge", config)
        assert_clean_failure(result, out, "No space left on device", "model-00002-of", inputs_before=before,
                             status=1)
        assert listing(disk) == []


@pytest.mark.parametrize("output_name", ["merged.safetensors", "sharded", "merged.pth"])
@pytest.mark.parametrize("fail_after", [1, 25])
def test_write_failing_after_space_was_checked(tmp_path, models, monkeypatch, output_name, fail_after):
    """The free-space check passes, then a write fails (a quota, another process): a clean OutputError."""
    import streammerge.io.safetensors_io as st

    real_pwrite, calls = os.pwrite, [0]

    def failing_pwrite(fd, data, position):
        calls[0] += 1
        if calls[0] > fail_after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, position)

    monkeypatch.setattr(st.os, "pwrite", failing_pwrite)
    out = tmp_path / "out" / output_name
    config = parse_config({"models": [str(m) for m in models[:2]], "output": str(out), "shard_size": "1MB"})
    with pytest.raises(OutputError, match="No space left on device"):
        merge(config, quiet=True)
    assert not (tmp_path / "out").exists(), listing(tmp_path / "out")


@pytest.mark.parametrize("name", ["merged.safetensors", "merged.pth"])
def test_leftovers_of_a_killed_single_file_run_are_removed(tmp_path, models, name):
    out = tmp_path / name
    stale = tmp_path / f".{name}.tmp-999999"
    stale.write_bytes(b"half a file")
    config = write_config(tmp_path / "m.yaml", [(m, 1) for m in models[:2]], out)
    result = run_main("merge", config)
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and "interrupted merge left" in result.stderr
    assert sorted(listing(tmp_path)) == ["m.yaml", name]


def test_a_live_writer_is_not_disturbed(tmp_path, models):
    """Another run's temporary file (locked by a live process) is neither removed nor overwritten."""
    import fcntl

    out = tmp_path / "merged.safetensors"
    live = tmp_path / ".merged.safetensors.tmp-1"
    with open(live, "wb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        config = write_config(tmp_path / "m.yaml", [(m, 1) for m in models[:2]], out)
        result = run_main("merge", config)
        assert result.returncode == 1 and "another streammerge run" in result.stderr, result.stderr
        assert live.exists() and not out.exists()


def test_a_second_run_into_the_same_directory_is_refused(tmp_path, larger_models):
    out = tmp_path / "out"
    config = write_config(tmp_path / "m.yaml", [(m, 1) for m in larger_models], out, shard_size="1MB")
    process = start_merge(config, "--quiet")
    try:
        assert wait_for(lambda: in_progress(out), process), "the first merge ended too soon"
        freeze(process)
        before = listing(out)
        second = run_main("merge", config)
        assert second.returncode == 1 and "another streammerge run" in second.stderr, second.stderr
        assert listing(out) == before  # the first run's files are untouched
        process.send_signal(signal.SIGCONT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert (out / "model.safetensors.index.json").exists()


def test_cleanup_cannot_be_interrupted():
    from streammerge.interrupts import Terminated, exit_status, uninterruptible

    with uninterruptible():
        os.kill(os.getpid(), signal.SIGINT)  # ignored while cleaning up
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert exit_status(Terminated(signal.SIGTERM)) == 143 and exit_status(KeyboardInterrupt()) == 130


def test_signals_during_an_output_step_are_acted_on_after_it():
    from streammerge.interrupts import Terminated, install_handlers, signals_deferred

    steps = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("finished")  # not cut short
    assert steps == ["finished"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous = signal.getsignal(signal.SIGTERM)
    try:
        install_handlers()
        with pytest.raises(Terminated):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                steps.append("finished again")
        assert steps[-1] == "finished again"
    finally:
        signal.signal(signal.SIGTERM, previous)
