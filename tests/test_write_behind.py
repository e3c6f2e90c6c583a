"""Outputs are written back as they go and their pages let go behind the writer, the file whole and durable."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from helpers import cached, merge_in_process, save
from streammerge.io.files import AtomicFile, WriteBehind

MIB = 1024**2


@pytest.fixture
def drops_pages(tmp_path):
    """Skip where the file system keeps written-back pages in the page cache (tmpfs: they are the file)."""
    probe = tmp_path / "probe"
    with open(probe, "wb") as f:
        f.write(os.urandom(MIB))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, MIB, os.POSIX_FADV_DONTNEED)
    if cached(probe, 0, MIB):
        pytest.skip("this file system keeps written pages in the page cache")
    probe.unlink()


def test_pages_are_let_go_behind_the_writer(tmp_path, monkeypatch, drops_pages):
    monkeypatch.setattr(WriteBehind, "LAG_BYTES", 4 * MIB)
    monkeypatch.setattr(AtomicFile, "WRITEBACK_BYTES", MIB)  # each MiB sent as it is written
    data = os.urandom(16 * MIB)
    target = AtomicFile(tmp_path / "out.bin")
    target.create()
    for position in range(0, len(data), MIB):  # in order, a MiB at a time, as a merge writes its chunks
        target.write_at(data[position:position + MIB], position)
        target.write_back(position, MIB)
    assert not cached(target.tmp_path, 0, 8 * MIB)  # more than LAG_BYTES behind: written back and let go
    assert cached(target.tmp_path, 12 * MIB, 4 * MIB)  # the last LAG_BYTES: kept
    target.commit()
    assert (tmp_path / "out.bin").read_bytes() == data


def test_a_merged_output_leaves_the_page_cache_behind_its_writer(tmp_path, monkeypatch, drops_pages):
    """A merge through the engine's writer: the output holds the merge, and its early part is no longer cached
    once the merge is done."""
    monkeypatch.setattr(WriteBehind, "LAG_BYTES", 2 * MIB)
    g = torch.Generator().manual_seed(0)
    models = [{f"w{k}": torch.randn(512, 1024, generator=g) for k in range(12)} for _ in range(2)]  # 24 MiB each
    paths = [save(m, tmp_path / f"model{i}.safetensors") for i, m in enumerate(models)]
    output = tmp_path / "out.safetensors"
    merge_in_process({"method": "linear", "output": str(output),
                      "models": [{"path": str(p), "weight": 0.5} for p in paths]}, chunk=256 * 1024)
    assert not cached(output, 0, 8 * MIB)
    merged = load_file(output)
    for name in models[0]:
        assert torch.equal(merged[name], models[0][name] * 0.5 + models[1][name] * 0.5)
