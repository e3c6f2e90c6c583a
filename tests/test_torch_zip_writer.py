"""The streaming torch zip writer against torch.save, zipfile and every torch.load path."""

import io
import os
import struct
import zipfile

import pytest
import torch

from streammerge.io import torch_zip_writer
from streammerge.io.pth_output import StorageRef, TensorRef, contiguous_stride, pickle_checkpoint
from streammerge.io.torch_zip_writer import TorchZipWriter


def sample_state_dict() -> dict:
    g = torch.Generator().manual_seed(0)
    sd = {
        "w": torch.randn(5, 3, generator=g),
        "scalar": torch.tensor(7),
        "half": torch.randn(4, generator=g).half(),
        "bf16": torch.randn(2, 2, generator=g).bfloat16(),
        "empty": torch.zeros(0, 3),
        "f8": torch.randn(9, generator=g).to(torch.float8_e4m3fn),
        "u16": torch.tensor([1, 2, 3], dtype=torch.int32).to(torch.uint16),
        "mask": torch.tensor([True, False]),
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
    }
    sd["tied"] = sd["w"]
    return sd


def refs_for(sd: dict) -> tuple[dict, list[StorageRef]]:
    """TensorRefs mirroring `sd`; names holding the same tensor object share one storage."""
    storages, refs, by_id = [], {}, {}
    for name, t in sd.items():
        if id(t) not in by_id:
            storage = StorageRef(str(len(storages)), t.dtype, t.numel())
            storages.append(storage)
            by_id[id(t)] = TensorRef(storage, tuple(t.shape))
        refs[name] = by_id[id(t)]
    return refs, storages


def write_streamed(path, obj_with_refs, sd, storages, piece=7, order=None):
    writer = TorchZipWriter(path, pickle_checkpoint(obj_with_refs), [s.nbytes for s in storages])
    writer.open()
    written = set()
    for name, t in sd.items():
        if id(t) in written:
            continue
        written.add(id(t))
        key = int(obj_with_refs["model"][name].storage.key)
        data = t.reshape(-1).contiguous().view(torch.uint8)
        starts = list(range(0, data.numel(), piece))
        for start in (order(starts) if order else starts):
            writer.write(key, start, data[start:start + piece].numpy())
    writer.commit()
    return writer


def checkpoint_obj(sd):
    return {"model": sd, "config": {"x": [1, 2.5, None, "s"], "y": True}, "step": 3, "epoch": 1,
            "model_loss": {"train_loss": 1.25, "eval_loss": 2.5}}


def test_bytes_match_torch_save_except_serialization_id(tmp_path):
    sd = sample_state_dict()
    buffer = io.BytesIO()
    torch.save(checkpoint_obj(sd), buffer)  # a file object: torch names the archive folder "archive"
    expected = buffer.getvalue()
    refs, storages = refs_for(sd)
    write_streamed(tmp_path / "out.pth", checkpoint_obj(refs), sd, storages)
    ours = (tmp_path / "out.pth").read_bytes()
    assert len(ours) == len(expected)
    theirs_zip, ours_zip = zipfile.ZipFile(io.BytesIO(expected)), zipfile.ZipFile(tmp_path / "out.pth")
    assert [(i.filename, i.header_offset, i.file_size) for i in ours_zip.infolist()] == \
           [(i.filename, i.header_offset, i.file_size) for i in theirs_zip.infolist()]
    # Only the serialization id may differ (torch's is random): its 40 digits and its CRC, which sits in the
    # data descriptor after it and in its central directory entry (the last one).
    sid = ours_zip.getinfo("archive/.data/serialization_id")
    name_len, extra_len = struct.unpack("<HH", ours[sid.header_offset + 26:sid.header_offset + 30])
    data = sid.header_offset + 30 + name_len + extra_len
    central = ours.rindex(b"PK\x01\x02")
    allowed = set(range(data, data + 40)) | set(range(data + 44, data + 48)) | set(range(central + 16, central + 20))
    assert {i for i in range(len(ours)) if ours[i] != expected[i]} <= allowed
    assert ours_zip.testzip() is None
    assert len(ours_zip.read("archive/.data/serialization_id")) == 40


@pytest.mark.parametrize("mmap", [False, True])
def test_torch_load_reads_every_tensor(tmp_path, mmap):
    sd = sample_state_dict()
    refs, storages = refs_for(sd)
    write_streamed(tmp_path / "out.pth", checkpoint_obj(refs), sd, storages)
    loaded = torch.load(tmp_path / "out.pth", weights_only=True, mmap=mmap)
    assert {k: v for k, v in loaded.items() if k != "model"} == {k: v for k, v in checkpoint_obj(sd).items()
                                                                 if k != "model"}
    for name, t in sd.items():
        got = loaded["model"][name]
        assert got.dtype == t.dtype and got.shape == t.shape and got.stride() == contiguous_stride(t.shape)
        assert torch.equal(got.view(torch.uint8), t.view(torch.uint8)) if t.dim() else torch.equal(got, t)
    assert loaded["model"]["tied"].untyped_storage().data_ptr() == loaded["model"]["w"].untyped_storage().data_ptr()


def load_with_computed_offsets(path, monkeypatch):
    """torch's opt-in loader computes storage offsets from the miniz layout instead of reading local headers;
    with TORCH_SERIALIZATION_DEBUG it checks each against the header."""
    from torch.utils.serialization import config

    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")
    config.load.calculate_storage_offsets = True
    try:
        return torch.load(path, weights_only=True, mmap=True)
    finally:
        config.load.calculate_storage_offsets = False


def test_computed_storage_offsets_agree(tmp_path, monkeypatch):
    sd = sample_state_dict()
    refs, storages = refs_for(sd)
    write_streamed(tmp_path / "out.pth", checkpoint_obj(refs), sd, storages)
    loaded = load_with_computed_offsets(tmp_path / "out.pth", monkeypatch)
    assert torch.equal(loaded["model"]["w"], sd["w"])


def test_zip64_fields(tmp_path, monkeypatch):
    """Files past 4 GiB need ZIP64 sizes and offsets; lower the threshold to exercise them on small data."""
    monkeypatch.setattr(torch_zip_writer, "ZIP64_LIMIT", 100)
    sd = {"big": torch.randn(50, 3), "scalar": torch.tensor(7), "small": torch.ones(3)}
    refs, storages = refs_for(sd)
    write_streamed(tmp_path / "z.pth", {"model": refs}, sd, storages, piece=64)
    archive = zipfile.ZipFile(tmp_path / "z.pth")
    assert archive.testzip() is None
    assert archive.getinfo("archive/data/0").file_size == 600
    for mmap in (False, True):
        loaded = torch.load(tmp_path / "z.pth", weights_only=True, mmap=mmap)
        assert all(torch.equal(loaded["model"][k], sd[k]) for k in sd)
    loaded = load_with_computed_offsets(tmp_path / "z.pth", monkeypatch)
    assert all(torch.equal(loaded["model"][k], sd[k]) for k in sd)


def test_out_of_order_writes_get_the_right_crc(tmp_path):
    sd = {"w": torch.randn(40, 5)}
    refs, storages = refs_for(sd)
    write_streamed(tmp_path / "a.pth", {"model": refs}, sd, storages, piece=64, order=lambda s: s[::-1])
    assert zipfile.ZipFile(tmp_path / "a.pth").testzip() is None
    assert torch.equal(torch.load(tmp_path / "a.pth", weights_only=True)["model"]["w"], sd["w"])


def test_copy_between_storages(tmp_path):
    t = torch.randn(100)
    storages = [StorageRef("0", t.dtype, 100), StorageRef("1", t.dtype, 100)]
    obj = {"a": TensorRef(storages[0], (100,)), "b": TensorRef(storages[1], (100,))}
    writer = TorchZipWriter(tmp_path / "c.pth", pickle_checkpoint(obj), [400, 400])
    writer.open()
    writer.write(0, 0, t.view(torch.uint8).numpy())
    writer.copy(0, 1, chunk_bytes=64)
    writer.commit()
    loaded = torch.load(tmp_path / "c.pth", weights_only=True)
    assert torch.equal(loaded["a"], t) and torch.equal(loaded["b"], t)
    assert zipfile.ZipFile(tmp_path / "c.pth").testzip() is None


def test_abort_leaves_nothing(tmp_path):
    writer = TorchZipWriter(tmp_path / "x.pth", pickle_checkpoint({}), [16])
    writer.open()
    writer.write(0, 0, bytes(8))
    writer.abort()
    assert os.listdir(tmp_path) == []


def test_writes_past_a_storage_are_refused(tmp_path):
    writer = TorchZipWriter(tmp_path / "x.pth", pickle_checkpoint({}), [16])
    writer.open()
    try:
        with pytest.raises(ValueError):
            writer.write(0, 12, bytes(8))
    finally:
        writer.abort()
