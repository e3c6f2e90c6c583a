"""Interrupted sharded merges: kill -9 and resume gives the uninterrupted result bit for bit, completed shards are
kept (not rewritten), anything that does not verify is redone, and a run without --resume cleans up."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from safety_support import (done_shards, freeze, in_progress, inode, listing, run_main, snapshot, start_merge,
                            wait_for, write_config)

import synth
from streammerge.config import load_config
from streammerge.engine import merge
from streammerge.io import sharded_output
from streammerge.io.resume import MANIFEST

SHARD_SIZE = "300KB"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return synth.write_models(tmp_path_factory.mktemp("models"), 3, "safetensors", shrink=16)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models):
    """The uninterrupted result."""
    root = tmp_path_factory.mktemp("reference")
    config = write_config(root / "m.yaml", list(zip(models, [0.5, 0.3, 0.2])), root / "out", shard_size=SHARD_SIZE)
    merge(load_config(config), quiet=True)
    return root / "out"


def contents(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


def assert_same_output(out: Path, reference: Path) -> None:
    assert listing(out) == listing(reference)  # no hidden leftovers either
    expected = contents(reference)
    for name, data in contents(out).items():
        assert data == expected[name], name


@pytest.fixture
def config(tmp_path, models):
    return write_config(tmp_path / "m.yaml", list(zip(models, [0.5, 0.3, 0.2])), tmp_path / "out",
                        shard_size=SHARD_SIZE)


class Killed(Exception):
    pass


def killed_run(monkeypatch, config: Path, complete: int) -> None:
    """Run in this process and stop dead once `complete` shards are done and the next one is fully written but
    not renamed: what kill -9 leaves (finished shards, the manifest, an unlocked temporary file)."""
    real_finish, finished = sharded_output.ShardedOutput._finish, [0]

    def finish(self, shard):
        if finished[0] == complete:
            raise Killed
        real_finish(self, shard)
        finished[0] += 1

    def abort_like_a_kill(self):  # nothing is cleaned up; the dead process's file locks go with it
        for shard in self.shards:
            if shard.writer.fd >= 0:
                os.close(shard.writer.fd)
                shard.writer.fd = -1
        self._unlock()

    with monkeypatch.context() as patch:
        patch.setattr(sharded_output.ShardedOutput, "_finish", finish)
        patch.setattr(sharded_output.ShardedOutput, "abort", abort_like_a_kill)
        with pytest.raises(Killed):
            merge(load_config(config), quiet=True)


def test_kill_9_then_resume_is_bit_identical_and_keeps_completed_shards(tmp_path, models, reference):
    out = tmp_path / "out"
    config = write_config(tmp_path / "m.yaml", list(zip(models, [0.5, 0.3, 0.2])), out, shard_size=SHARD_SIZE)
    before = snapshot(*models)
    process = start_merge(config, "--quiet")
    try:
        assert wait_for(lambda: len(done_shards(out)) >= 3, process), "the merge ended before it could be killed"
        freeze(process)  # freeze it, look, then kill -9
        assert in_progress(out)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        process.kill()
    assert process.returncode == -signal.SIGKILL
    kept = {p.name[1:-len(".done")]: inode(p) for p in done_shards(out)}
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["completed"]) <= set(kept)
    assert not list(out.glob("model-*")) and not (out / "model.safetensors.index.json").exists()

    report = tmp_path / "report.json"
    rerun = start_merge(config, "--resume", "--report", report)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert "already complete and verified" in stderr
    assert_same_output(out, reference)
    reused = json.loads(report.read_text())["reused_files"]
    assert sorted(Path(p).name for p in reused) == sorted(manifest["completed"])
    for name in manifest["completed"]:
        assert inode(out / name) == kept[name]  # renamed into place, never rewritten
    assert snapshot(*models) == before


def test_resume_after_a_simulated_kill(tmp_path, config, reference, monkeypatch):
    killed_run(monkeypatch, config, complete=4)
    out = tmp_path / "out"
    assert len(done_shards(out)) == 4 and any(".tmp-" in name for name in listing(out))
    report = tmp_path / "report.json"
    result = run_main("merge", config, "--resume", "--report", report)
    assert result.returncode == 0, result.stderr
    assert "4 of" in result.stderr and "interrupted merge left" in result.stderr  # the stale temporary file
    assert_same_output(out, reference)
    data = json.loads(report.read_text())
    assert len(data["reused_files"]) == 4
    assert 0 < data["read_bytes"] < 3 * sum(f.stat().st_size for f in reference.glob("*.safetensors"))


def test_without_resume_the_leftovers_are_removed_and_the_merge_starts_over(tmp_path, config, reference,
                                                                             monkeypatch):
    killed_run(monkeypatch, config, complete=3)
    report = tmp_path / "report.json"
    result = run_main("merge", config, "--report", report)
    assert result.returncode == 0, result.stderr
    assert "removed 5 file(s) an interrupted merge left" in result.stderr  # 3 shards, the manifest, a temporary
    assert json.loads(report.read_text())["reused_files"] == []
    assert_same_output(tmp_path / "out", reference)


def test_a_shard_that_does_not_verify_is_redone(tmp_path, config, reference, monkeypatch):
    killed_run(monkeypatch, config, complete=3)
    first, second, third = done_shards(tmp_path / "out")
    data = bytearray(second.read_bytes())
    data[-1] ^= 0xFF
    second.write_bytes(bytes(data))
    third.unlink()
    report = tmp_path / "report.json"
    result = run_main("merge", config, "--resume", "--report", report)
    assert result.returncode == 0, result.stderr
    assert [Path(p).name for p in json.loads(report.read_text())["reused_files"]] == [first.name[1:-5]]
    assert_same_output(tmp_path / "out", reference)


def test_a_different_recipe_is_refused(tmp_path, models, config, monkeypatch):
    killed_run(monkeypatch, config, complete=2)
    before = listing(tmp_path / "out")
    other = write_config(tmp_path / "other.yaml", list(zip(models, [0.2, 0.3, 0.5])), tmp_path / "out",
                         shard_size=SHARD_SIZE)
    result = run_main("merge", other, "--resume")
    assert result.returncode == 1 and "the recipe differs" in result.stderr and "without --resume" in result.stderr
    assert listing(tmp_path / "out") == before


def test_changed_inputs_are_refused(tmp_path, models, config, monkeypatch):
    killed_run(monkeypatch, config, complete=2)
    before = listing(tmp_path / "out")
    st = os.stat(models[1])
    os.utime(models[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        result = run_main("merge", config, "--resume")
    finally:
        os.utime(models[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert result.returncode == 1 and f"the input {models[1]} changed" in result.stderr, result.stderr
    assert listing(tmp_path / "out") == before


def test_an_unreadable_manifest_is_refused(tmp_path, config, monkeypatch):
    killed_run(monkeypatch, config, complete=2)
    (tmp_path / "out" / MANIFEST).write_text("{not json")
    result = run_main("merge", config, "--resume")
    assert result.returncode == 1 and MANIFEST in result.stderr and "Traceback" not in result.stderr


def test_resume_with_nothing_to_resume_merges_from_the_start(tmp_path, config, reference):
    result = run_main("merge", config, "--resume")
    assert result.returncode == 0 and "no interrupted merge to continue" in result.stderr
    assert_same_output(tmp_path / "out", reference)


def test_crash_during_the_final_renames(tmp_path, config, reference, monkeypatch):
    """Killed after some shards were renamed to their final names but before the index: still resumable."""
    killed_run(monkeypatch, config, complete=3)
    for done in done_shards(tmp_path / "out")[:2]:
        done.rename(done.with_name(done.name[1:-5]))
    report = tmp_path / "report.json"
    result = run_main("merge", config, "--resume", "--report", report)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(report.read_text())["reused_files"]) == 3
    assert_same_output(tmp_path / "out", reference)


def test_a_failing_resumed_run_keeps_what_it_reused(tmp_path, config, reference, monkeypatch):
    killed_run(monkeypatch, config, complete=2)
    reused = [p.name for p in done_shards(tmp_path / "out")]
    real_finish, finished = sharded_output.ShardedOutput._finish, [0]

    def finish_then_fail(self, shard):
        real_finish(self, shard)
        finished[0] += 1
        if finished[0] == 2:
            raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(sharded_output.ShardedOutput, "_finish", finish_then_fail)
        result = run_main("merge", config, "--resume")
    assert result.returncode == 1 and "No space left on device" in result.stderr
    assert [p.name for p in done_shards(tmp_path / "out")] == reused  # its own new shards are gone
    assert listing(tmp_path / "out") == sorted(reused + [MANIFEST])
    result = run_main("merge", config, "--resume")
    assert result.returncode == 0, result.stderr
    assert_same_output(tmp_path / "out", reference)


def test_a_failed_rerun_leaves_the_previous_output_intact(tmp_path, config, models, monkeypatch):
    assert run_main("merge", config, "--quiet").returncode == 0
    before = contents(tmp_path / "out")
    other = write_config(tmp_path / "other.yaml", list(zip(models, [0.2, 0.3, 0.5])), tmp_path / "out",
                         shard_size=SHARD_SIZE)
    real_finish, finished = sharded_output.ShardedOutput._finish, [0]

    def finish_then_fail(self, shard):
        real_finish(self, shard)
        finished[0] += 1
        if finished[0] == 5:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(sharded_output.ShardedOutput, "_finish", finish_then_fail)
        result = run_main("merge", other, "--quiet")
    assert result.returncode == 130, result.stderr
    assert contents(tmp_path / "out") == before


def test_replacing_an_output_with_fewer_shards_removes_the_stale_ones(tmp_path, models):
    out = tmp_path / "out"
    many = write_config(tmp_path / "many.yaml", [(m, 1) for m in models], out, shard_size=SHARD_SIZE)
    assert run_main("merge", many, "--quiet").returncode == 0
    few = write_config(tmp_path / "few.yaml", [(m, 1) for m in models], out, shard_size="10MB")
    assert run_main("merge", few, "--quiet").returncode == 0
    assert sorted(listing(out)) == ["model.safetensors"]  # one shard now: the old shards and index are gone
