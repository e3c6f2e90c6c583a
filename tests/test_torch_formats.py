"""Torch zip (restricted path) and legacy files: every tensor equals torch.load of the same trusted file,
bit for bit."""

import os
import struct

import pytest
import torch

from ckpt_fixtures import (fairseq_ckpt, lightning_ckpt, load_trusted, save_legacy, save_xtts_trainer,
                           small_state_dict)
from streammerge.errors import CheckpointError
from streammerge.io import open_checkpoint
from streammerge.io.containers import find_state_dict
from streammerge.io.torch_legacy import read_torch_legacy
from streammerge.io.torch_zip import open_torch_zip_restricted

CONTAINERS = {
    "bare": lambda sd: sd,
    "lightning": lightning_ckpt,
    "fairseq": fairseq_ckpt,
    "nested": lambda sd: {"model": {"state_dict": sd}, "step": 2},
}


def assert_bitwise_equal(ckpt, reference: dict):
    assert sorted(ckpt.tensors) == sorted(reference)
    for name, info in ckpt.tensors.items():
        ref = reference[name]
        got = info.read().reshape(info.shape)
        assert got.dtype == ref.dtype and tuple(got.shape) == tuple(ref.shape), name
        as_bytes = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
        assert torch.equal(as_bytes(got), as_bytes(ref)), name


def reference_state_dict(path, container: str) -> dict:
    obj = load_trusted(path)
    for part in filter(None, container.split(".")):
        obj = obj[part]
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("kind", sorted(CONTAINERS))
def test_zip_restricted_path_matches_trusted_load(tmp_path, kind):
    path = tmp_path / "c.pt"
    torch.save(CONTAINERS[kind](small_state_dict(seed=3)), path)
    with open_torch_zip_restricted(path) as ckpt:
        assert_bitwise_equal(ckpt, reference_state_dict(path, ckpt.container))


@pytest.mark.parametrize("kind", sorted(CONTAINERS))
def test_legacy_matches_trusted_load(tmp_path, kind):
    path = save_legacy(CONTAINERS[kind](small_state_dict(seed=4)), tmp_path / "c.pt")
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "torch-legacy"
        assert_bitwise_equal(ckpt, reference_state_dict(path, ckpt.container))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_xtts_trainer_with_unimportable_config_matches_trusted_load(tmp_path, legacy):
    sd = small_state_dict(seed=5, prefix="xtts.")
    path = save_xtts_trainer(tmp_path / "model.pth", sd, legacy=legacy)
    with open_checkpoint(path) as ckpt:  # zip: torch's weights_only refuses XttsConfig; the restricted path reads it
        assert ckpt.container == "model"
        assert_bitwise_equal(ckpt, reference_state_dict(path, "model"))


def test_both_zip_paths_agree(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"model": small_state_dict(seed=6), "step": 3}, path)
    with open_checkpoint(path) as by_torch, open_torch_zip_restricted(path) as restricted:
        assert by_torch.container == restricted.container == "model"
        assert by_torch.metadata == restricted.metadata == {"step": 3}
        assert list(by_torch.tensors) == list(restricted.tensors)  # same file order
        for name, a in by_torch.tensors.items():
            b = restricted.tensors[name]
            assert (a.shape, a.dtype, a.offset, a.stride) == (b.shape, b.dtype, b.offset, b.stride), name


def test_unusual_dtypes_and_views(tmp_path):
    sd = {"f8": torch.randn(5).to(torch.float8_e4m3fn), "u16": torch.arange(6, dtype=torch.int32).to(torch.uint16),
          "c64": torch.randn(3, dtype=torch.complex64), "i8": torch.arange(-3, 3, dtype=torch.int8),
          "view": torch.randn(6, 6)[1:5, ::2], "expand": torch.randn(3, 1).expand(3, 4)}
    path = tmp_path / "c.pt"
    torch.save(sd, path)
    with open_torch_zip_restricted(path) as ckpt:
        assert_bitwise_equal(ckpt, sd)
    legacy = save_legacy({k: v for k, v in sd.items() if k not in ("f8", "u16")}, tmp_path / "l.pt")
    with open_checkpoint(legacy) as ckpt:  # (torch itself cannot re-read legacy float8/uint16 files)
        assert_bitwise_equal(ckpt, {k: v for k, v in sd.items() if k not in ("f8", "u16")})


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_tied_tensors_share_one_storage(tmp_path, legacy):
    path = tmp_path / "c.pt"
    sd = small_state_dict()
    save_legacy(sd, path) if legacy else torch.save({"model": sd, "config": {"__weird": 1}}, path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.tensors["head.weight"].storage_key == ckpt.tensors["embed.weight"].storage_key
        assert ckpt.tensors["encoder.weight"].storage_key != ckpt.tensors["embed.weight"].storage_key


@pytest.mark.parametrize("protocol", [2, 4])
def test_legacy_is_sniffed_from_bytes_not_names(tmp_path, protocol):
    path = tmp_path / "weights.safetensors"  # a misleading name
    sd = small_state_dict()
    torch.save({"model": sd}, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "torch-legacy"
        assert_bitwise_equal(ckpt, sd)


def test_legacy_reads_only_pickles_and_counts(tmp_path, monkeypatch):
    """The storages' bytes are mapped, never read through the file object."""
    sd = {"big": torch.randn(256, 1024)}
    path = save_legacy(sd, tmp_path / "c.pt")
    read_bytes = 0
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            nonlocal read_bytes
            data = self.f.read(n)
            read_bytes += len(data)
            return data

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    import streammerge.io.torch_legacy as legacy_module
    monkeypatch.setattr(legacy_module, "open", lambda *a, **k: Counting(real_open(*a, **k)), raising=False)
    obj, offsets = read_torch_legacy(path)
    assert read_bytes < 4096 < os.path.getsize(path)
    tensors, _, _ = find_state_dict(obj, path)
    assert tensors["big"].shape == (256, 1024)


def test_truncated_legacy_file(tmp_path):
    path = save_legacy({"model": small_state_dict()}, tmp_path / "c.pt")
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(path)


def test_corrupt_legacy_storage_count(tmp_path):
    path = save_legacy({"w": torch.randn(10)}, tmp_path / "c.pt")
    data = bytearray(path.read_bytes())
    start = len(data) - 40 - 8  # the only storage: 8-byte count, then 40 bytes
    assert struct.unpack("<q", data[start:start + 8]) == (10,)
    data[start:start + 8] = struct.pack("<q", 10**12)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not fit the file"):
        open_checkpoint(path)


def test_truncated_zip_file(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"config": {"a": argparse_namespace()}, "model": small_state_dict()}, path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        open_checkpoint(path)


def argparse_namespace():
    import argparse
    return argparse.Namespace(a=1)
