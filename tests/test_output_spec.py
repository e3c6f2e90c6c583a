"""The output seam: one function decides the kind, the spec says where every tensor's bytes go, and bytes written
at those offsets by another process (reporting their crc32) give the same file as the engine's own writes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import load_output
from streammerge.errors import OutputError
from streammerge.io.output_spec import TorchContainer
from streammerge.io.outputs import make_output, output_kind, output_spec

WORKER = """
import json, os, sys, zlib
from safetensors.torch import load_file
job = json.load(sys.stdin)
tensors = load_file(job["source"])
crcs = {}
for name, (temporary, offset) in job["placements"].items():
    data = tensors[name].contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()
    fd = os.open(temporary, os.O_WRONLY)  # created by the driver; never created here
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
    crcs[name] = zlib.crc32(data)
json.dump(crcs, sys.stdout)
"""


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {f"layers.{i}.weight": torch.randn(40 + i, 33, generator=g) for i in range(6)}
    out["norm"] = torch.randn(7, generator=g).half()
    out["step"] = torch.tensor([3, 4], dtype=torch.int64)
    out["empty"] = torch.zeros(0)
    out["head.weight"] = out["layers.0.weight"]  # tied
    return out


def spec_for(path: Path, values: dict):
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in values.items()]
    return output_spec(path, entries, {"format": "pt"}, aliases={"head.weight": "layers.0.weight"},
                       shard_size=3000, container=TorchContainer("model", ({"step": 5},), (1.0,)))


def written_by_engine_calls(path: Path, values: dict) -> None:
    output = make_output(spec_for(path, values))
    output.open()
    for name, t in values.items():
        if name != "head.weight":
            output.write(name, 0, t.reshape(-1))
    output.copy("layers.0.weight", "head.weight", 1000)
    output.commit()


def written_by_another_process(path: Path, values: dict, source: Path) -> None:
    spec = spec_for(path, values)
    output = make_output(spec)
    output.open()
    output.create_files()  # every temporary file, with its headers, before any worker writes
    placements = {name: [str(spec.files[p.file].temporary), p.offset] for name, p in spec.placements.items()}
    job = json.dumps({"source": str(source), "placements": placements})
    result = subprocess.run([sys.executable, "-c", WORKER], input=job, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name, crc in json.loads(result.stdout).items():
        output.record_checksum(name, crc)
    output.commit()


def digests(path: Path) -> dict[str, str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("name", ["out.safetensors", "out", "out.pth"])
def test_bytes_written_at_spec_offsets_by_another_process_give_the_same_output(tmp_path, name):
    values = tensors()
    source = tmp_path / "source.safetensors"
    save_file({k: v.clone() for k, v in values.items()}, source)
    written_by_engine_calls(tmp_path / "a" / name, values)
    written_by_another_process(tmp_path / "b" / name, values, source)
    assert digests(tmp_path / "a" / name) == digests(tmp_path / "b" / name)
    assert [p.name for p in (tmp_path / "b").rglob(".*")] == []  # no temporary or hidden file left
    if name.endswith(".pth"):
        loaded = torch.load(tmp_path / "b" / name, weights_only=True)
        assert loaded["step"] == 5
        loaded = loaded["model"]
        assert loaded["head.weight"].untyped_storage().data_ptr() == loaded["layers.0.weight"].untyped_storage().data_ptr()
    else:
        loaded = load_output(tmp_path / "b" / name)
    assert loaded.keys() == values.keys()
    for key, value in values.items():
        assert torch.equal(loaded[key], value), key


def test_spec_places_every_tensor_inside_its_file_without_overlap(tmp_path):
    values = tensors()
    for name in ("out.safetensors", "out", "out.pth"):
        spec = spec_for(tmp_path / name, values)
        spans = sorted({(p.file, p.offset, p.offset + p.nbytes) for p in spec.placements.values()})
        assert spec.placements.keys() == values.keys()
        for (file, _, end), (next_file, next_start, _) in zip(spans, spans[1:]):
            assert file != next_file or end <= next_start, name
        assert all(end <= spec.files[file].size for file, _, end in spans)
        assert all(spec.placements[k].nbytes == v.numel() * v.element_size() for k, v in values.items())
    assert len(spec_for(tmp_path / "out", values).files) > 1  # the small shard size splits the directory


@pytest.mark.parametrize("path, kind", [("a.pth", "torch checkpoint (.pth)"), ("a.pt", "torch checkpoint (.pth)"),
                                        ("a.safetensors", "safetensors file"),
                                        ("a", "sharded safetensors directory")])
def test_one_function_decides_the_kind(tmp_path, path, kind):
    assert output_kind(tmp_path / path).name == kind


def test_an_existing_directory_with_a_suffix_is_a_sharded_output(tmp_path):
    (tmp_path / "run.v2").mkdir()
    assert output_kind(tmp_path / "run.v2").name == "sharded safetensors directory"
    with pytest.raises(OutputError, match="unknown kind"):
        output_kind(tmp_path / "other.v2")
