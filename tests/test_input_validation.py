"""Every input is validated before any output exists; each defect gives one message naming the file (and the
tensor), through the API and through the command line."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from safety_support import assert_clean_failure, snapshot, write_config

from streammerge.errors import CheckpointError
from streammerge.io import open_checkpoint


def raw_safetensors(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors file from a header (dict or raw bytes) and data, optionally with a lying length field."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def two_tensors(**overrides) -> dict:
    header = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}
    for name, entry in overrides.items():
        header[name] = {**header[name], **entry} if isinstance(entry, dict) else entry
    return header


def refused(path: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        with open_checkpoint(path) as c:
            for t in c.tensors.values():
                t.read()
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_valid_raw_file_reads(tmp_path):
    path = raw_safetensors(tmp_path / "ok.safetensors", two_tensors(), struct.pack("<8f", *range(8)))
    with open_checkpoint(path) as c:
        assert c.tensors["b"].read().tolist() == [4.0, 5.0, 6.0, 7.0]


HEADER_CASES = ["length past end", "length over limit", "bad utf-8", "bad json", "deep json", "not an object",
                "duplicate key", "unknown dtype", "dtype not a string", "negative dim", "float dim", "bool dim",
                "numel overflow", "many dims", "dim over int64", "size mismatch", "offsets reversed",
                "negative offset", "offsets past end", "gap", "overlap", "trailing bytes", "extra key",
                "entry not an object", "metadata not strings"]


@pytest.mark.parametrize("header, data, length, fragments", ids=HEADER_CASES, argvalues=[
    (two_tensors(), b"\0" * 32, 10**6, ["header length 1000000 runs past the end"]),
    (two_tensors(), b"\0" * 32, 200_000_000, ["exceeds the 100000000-byte limit"]),
    (b'{"a": \xff}', b"", None, ["not valid UTF-8 JSON"]),
    (b'{"a": {"dtype": "F32",', b"", None, ["not valid UTF-8 JSON"]),
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", None, ["nested too deeply"]),
    (b'[1, 2]', b"", None, ["not a checkpoint format"]),
    (b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, '
     b'"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}', b"\0" * 32, None, ["names 'a' twice"]),
    (two_tensors(a={"dtype": "F33"}), b"\0" * 32, None, ["tensor 'a'", "unknown dtype 'F33'"]),
    (two_tensors(a={"dtype": ["F32"]}), b"\0" * 32, None, ["tensor 'a'", "unknown dtype"]),
    (two_tensors(a={"shape": [2, -2]}), b"\0" * 32, None, ["tensor 'a'", "non-negative integers"]),
    (two_tensors(a={"shape": [2.0, 2]}), b"\0" * 32, None, ["tensor 'a'", "non-negative integers"]),
    (two_tensors(a={"shape": [True, 4]}), b"\0" * 32, None, ["tensor 'a'", "non-negative integers"]),
    (two_tensors(a={"shape": [2**40, 2**40]}), b"\0" * 32, None, ["tensor 'a'", "more than 2**63 elements"]),
    (two_tensors(a={"shape": [2] * 200_000}), b"\0" * 32, None, ["tensor 'a'", "more than 2**63 elements"]),
    (two_tensors(a={"shape": [2**64]}), b"\0" * 32, None, ["tensor 'a'", "below 2**63"]),
    (two_tensors(a={"shape": [3, 2]}), b"\0" * 32, None, ["tensor 'a'", "holds 16 bytes but shape [3, 2]"]),
    (two_tensors(a={"data_offsets": [16, 0]}), b"\0" * 32, None, ["tensor 'a'", "is not [begin, end]"]),
    (two_tensors(a={"data_offsets": [0, -16]}), b"\0" * 32, None, ["tensor 'a'", "is not [begin, end]"]),
    (two_tensors(b={"data_offsets": [16, 48], "shape": [8]}), b"\0" * 32, None, ["tensor 'b'", "past the end"]),
    (two_tensors(b={"data_offsets": [20, 36]}), b"\0" * 36, None, ["tensor 'b'", "gap or overlap"]),
    (two_tensors(b={"data_offsets": [8, 24]}), b"\0" * 32, None, ["tensor 'b'", "gap or overlap"]),
    (two_tensors(), b"\0" * 40, None, ["tensors cover 32 bytes", "has 40"]),
    (two_tensors(a={"extra": 1}), b"\0" * 32, None, ["tensor 'a'", "exactly dtype, shape and data_offsets"]),
    (two_tensors(a=[1, 2]), b"\0" * 32, None, ["tensor 'a'", "exactly dtype, shape and data_offsets"]),
    ({**two_tensors(), "__metadata__": {"format": 1}}, b"\0" * 32, None, ["__metadata__ must map strings"]),
])
def test_malformed_safetensors_header_is_refused(tmp_path, header, data, length, fragments):
    refused(raw_safetensors(tmp_path / "bad.safetensors", header, data, length), *fragments)


def test_tiny_and_truncated_files(tmp_path):
    ok = tmp_path / "ok.safetensors"
    save_file({"w": torch.ones(64, 64)}, ok)
    blob = ok.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(blob[:len(blob) - 100])
    refused(tmp_path / "short.safetensors", "tensor 'w'", "past the end")
    (tmp_path / "seven.safetensors").write_bytes(blob[:7])
    refused(tmp_path / "seven.safetensors")  # not even a length field: no format recognises it


# -- sharded indexes ----------------------------------------------------------------------------------------

def sharded(tmp_path: Path, weight_map: dict, metadata=None, raw: bytes | None = None) -> Path:
    save_file({"a": torch.ones(4)}, tmp_path / "s1.safetensors")
    save_file({"b": torch.ones(4)}, tmp_path / "s2.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(raw if raw is not None else json.dumps(
        {"metadata": {"total_size": 32} if metadata is None else metadata, "weight_map": weight_map}).encode())
    return index


def test_valid_index_reads(tmp_path):
    with open_checkpoint(sharded(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"})) as c:
        assert sorted(c.tensors) == ["a", "b"]


@pytest.mark.parametrize("weight_map, metadata, raw, fragments", ids=[
    "missing shard", "tensor not in shard", "shard not a string", "absolute shard", "shard outside",
    "shard a list", "metadata a list", "empty weight map", "duplicate key", "deep json"], argvalues=[
    ({"a": "s1.safetensors", "b": "s3.safetensors"}, None, None, ["'s3.safetensors', which does not exist"]),
    ({"a": "s1.safetensors", "b": "s1.safetensors"}, None, None, ["'b' is listed", "'s1.safetensors'",
                                                                   "does not hold it"]),
    ({"a": "s1.safetensors", "b": 7}, None, None, ["maps 'b' to 7"]),
    ({"a": "s1.safetensors", "b": "/etc/passwd"}, None, None, ["maps 'b' to '/etc/passwd'"]),
    ({"a": "s1.safetensors", "b": "../s2.safetensors"}, None, None, ["maps 'b' to '../s2.safetensors'"]),
    ({"a": "s1.safetensors", "b": ["s2.safetensors"]}, None, None, ["maps 'b' to"]),
    ({"a": "s1.safetensors", "b": "s2.safetensors"}, [1], None, ["'metadata' must be a mapping"]),
    ({}, None, None, ["non-empty 'weight_map'"]),
    (None, None, b'{"weight_map": {"a": "s1.safetensors", "a": "s2.safetensors"}}', ["names 'a' twice"]),
    (None, None, b'{"weight_map": ' * 50_000, ["not a readable shard index"]),
])
def test_malformed_index_is_refused(tmp_path, weight_map, metadata, raw, fragments):
    refused(sharded(tmp_path, weight_map, metadata, raw), *fragments)


def test_enormous_index_is_refused_without_reading_it(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    with open(index, "wb") as f:
        f.write(b"{")
        f.truncate(200_000_000)  # sparse: costs no disk
    refused(index, "far larger than any real one")


# -- zip-format torch files ------------------------------------------------------------------------------------

def torch_zip(path: Path, obj=None) -> Path:
    torch.save(obj if obj is not None else {"w": torch.arange(1000, dtype=torch.float32), "v": torch.ones(5, 5)},
               path)
    return path


def rezip(src: Path, dst: Path, compression=zipfile.ZIP_STORED, change=lambda name, data: data) -> Path:
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w", compression) as b:
        for info in a.infolist():
            data = change(info.filename, a.read(info.filename))
            if data is not None:
                b.writestr(info.filename, data)
    return dst


def patch_central_size(path: Path, member_suffix: str, new_size: int) -> None:
    """Make the central directory claim a larger size for one record (its bytes would run past the file)."""
    blob = bytearray(path.read_bytes())
    i = blob.find(b"PK\x01\x02")
    while i >= 0:
        name_len = struct.unpack_from("<H", blob, i + 28)[0]
        if bytes(blob[i + 46:i + 46 + name_len]).decode().endswith(member_suffix):
            struct.pack_into("<II", blob, i + 20, new_size, new_size)
        i = blob.find(b"PK\x01\x02", i + 4)
    path.write_bytes(bytes(blob))


def test_valid_torch_zip_reads(tmp_path):
    with open_checkpoint(torch_zip(tmp_path / "ok.pth")) as c:
        assert c.tensors["w"].read()[999].item() == 999.0


def test_truncated_torch_zip(tmp_path):
    blob = torch_zip(tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(blob[:len(blob) // 2])
    refused(tmp_path / "cut.pth", "truncated or corrupt")


def test_compressed_torch_zip_is_refused_with_advice(tmp_path):
    src = torch_zip(tmp_path / "ok.pth")
    refused(rezip(src, tmp_path / "deflated.pth", zipfile.ZIP_DEFLATED), "is compressed", "torch.save")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated, files remain
def test_torchscript_archive_is_refused_as_such(tmp_path):
    """torch.jit.save deflates its code records: the refusal names TorchScript and how to get a checkpoint,
    not a re-zipping tool (nothing from the archive is unpickled, so nothing in it runs)."""
    path = tmp_path / "model.jit"
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), str(path))
    message = refused(path, "TorchScript", "torch.jit.load(path).state_dict()")
    assert "compressed" not in message and "\n" not in message


def test_record_past_end_of_file(tmp_path):
    path = torch_zip(tmp_path / "ok.pth")
    patch_central_size(path, "data/0", 10**8)
    refused(path, "record", "data/0", "the file has")


def test_missing_data_record(tmp_path):
    src = torch_zip(tmp_path / "ok.pth")
    refused(rezip(src, tmp_path / "missing.pth", change=lambda n, d: None if n.endswith("data/1") else d))


def test_record_shorter_than_its_tensor(tmp_path):
    src = torch_zip(tmp_path / "ok.pth")
    refused(rezip(src, tmp_path / "short.pth", change=lambda n, d: d[:100] if n.endswith("data/0") else d))


def test_zip_without_pickle(tmp_path):
    with zipfile.ZipFile(tmp_path / "nopickle.pth", "w") as z:
        z.writestr("archive/data/0", b"\0" * 16)
    refused(tmp_path / "nopickle.pth", "no data.pkl")


class RunsAShellCommand:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_zip(path: Path, marker: Path) -> Path:
    src = torch_zip(path.with_name("clean.pth"))
    evil = pickle.dumps({"w": RunsAShellCommand(marker)}, protocol=2)
    return rezip(src, path, change=lambda n, d: evil if n.endswith("data.pkl") else d)


def test_pickle_that_would_run_a_command_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    refused(malicious_zip(tmp_path / "evil.pth", marker))
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(RunsAShellCommand(marker)))
    refused(tmp_path / "evil.pkl")
    assert not marker.exists()


# -- the same through the command line: non-zero exit, the culprit named, nothing written -----------------------

@pytest.fixture
def pair(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"x": torch.randn(64, 64), "y": torch.randn(100)}, a)
    save_file({"x": torch.randn(64, 64), "y": torch.randn(100)}, b)
    return a, b


def cli_refuses(run_cli, tmp_path, bad: Path, good: Path, *culprits: str):
    out = tmp_path / "out" / "merged.safetensors"
    config = write_config(tmp_path / "merge.yaml", [(good, None), (bad, None)], out)
    before = snapshot(good, bad)
    result = run_cli("merge", config)
    assert_clean_failure(result, out, str(bad), *culprits, inputs_before=before, status=1)
    assert not out.parent.exists()


def test_cli_truncated_file(cli, tmp_path, pair):
    good, bad = pair
    bad.write_bytes(bad.read_bytes()[:-1000])
    cli_refuses(cli, tmp_path, bad, good, "'x'", "truncated")


def test_cli_header_length_past_end_of_file(cli, tmp_path, pair):
    good, bad = pair
    blob = bad.read_bytes()
    bad.write_bytes(struct.pack("<Q", 10**7) + blob[8:])
    cli_refuses(cli, tmp_path, bad, good, "runs past the end of the file")


def test_cli_garbage_bytes(cli, tmp_path, pair):
    good, bad = pair
    bad.write_bytes(os.urandom(5000))
    cli_refuses(cli, tmp_path, bad, good)


def test_cli_pickle_that_would_run_a_command(cli, tmp_path, pair):
    good, _ = pair
    marker = tmp_path / "marker"
    cli_refuses(cli, tmp_path, malicious_zip(tmp_path / "evil.pth", marker), good)
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(RunsAShellCommand(marker)))
    cli_refuses(cli, tmp_path, raw, good)
    assert not marker.exists()


def test_cli_mismatched_shapes(cli, tmp_path, pair):
    good, bad = pair
    save_file({"x": torch.randn(64, 32), "y": torch.randn(100)}, bad)
    cli_refuses(cli, tmp_path, bad, good, "'x'", "[64, 64]", "[64, 32]")
