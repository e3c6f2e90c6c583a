"""`streammerge convert`: bit-for-bit safetensors from any readable checkpoint, single files and trees."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from xtts_helpers import run_in_process, write_plain, write_trainer

ROOT = Path(__file__).resolve().parent.parent

@pytest.fixture
def run(capsys):
    return lambda *args: run_in_process(capsys, *args)


def odd_state_dict() -> dict:
    """Every kind of tensor a checkpoint may hold, with bit patterns that must survive unchanged."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g)
    w[0, 0], w[0, 1], w[0, 2] = float("nan"), float("-inf"), -0.0
    state = {
        "w": w,
        "tied": w,  # same storage under two names
        "transposed": torch.randn(4, 7, generator=g).t(),  # torch.save keeps the strides
        "view": w[2:4],  # a view into the middle of a shared storage
        "bf16": torch.randn(3, 3, generator=g).bfloat16(),
        "f16": torch.randn(5, generator=g).half(),
        "f64": torch.randn(2, generator=g, dtype=torch.float64),
        "steps": torch.tensor(12345),
        "ids": torch.arange(10, dtype=torch.int32),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }
    return state


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def test_pth_to_safetensors_bit_for_bit(cli, tmp_path):
    state = odd_state_dict()
    torch.save({"model": state, "config": {"a": 1, "nested": {"b": [1, 2]}}, "step": 7, "date": "today",
                "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": []}}, tmp_path / "x.pth")
    result = cli("convert", tmp_path / "x.pth", "--output", tmp_path / "x.safetensors", "--max-ram", "256MiB")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"converted {tmp_path / 'x.pth'} -> {tmp_path / 'x.safetensors'} (11 tensors")
    expected = torch.load(tmp_path / "x.pth", weights_only=True)["model"]
    got = load_file(tmp_path / "x.safetensors")
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert same_bits(got[name], tensor), name
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta == {"format": "pt", "config": json.dumps({"a": 1, "nested": {"b": [1, 2]}}), "step": "7",
                    "date": '"today"'}
    assert sorted(os.listdir(tmp_path)) == ["x.pth", "x.safetensors"]


def test_coqui_trainer_checkpoint(run, tmp_path):
    write_trainer(tmp_path / "t.pth", 0, 1000, 2, (1.0, 2.0), prefix="xtts.", extras=True, optimizer=True)
    result = run("convert", tmp_path / "t.pth", "--output", tmp_path / "t.safetensors")
    assert result.returncode == 0, result.stdout + result.stderr
    expected = torch.load(tmp_path / "t.pth", weights_only=True)
    got = load_file(tmp_path / "t.safetensors")
    assert set(got) == set(expected["model"]) and all(same_bits(got[k], v) for k, v in expected["model"].items())
    with safe_open(tmp_path / "t.safetensors", "pt") as f:
        meta = f.metadata()
    assert "optimizer" not in meta and "scaler" not in meta
    assert json.loads(meta["model_loss"]) == {"train_loss": 1.0, "eval_loss": 2.0}
    assert json.loads(meta["config"]) == expected["config"]


def test_optimizer_state_under_any_key_is_left_out(run, tmp_path):
    model = {"w": torch.randn(4)}
    optimizer = {"state": {0: {"exp_avg": torch.zeros(8)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    torch.save({"step": 3, "model_state": model, "optimizer_state": optimizer, "adam": optimizer},
               tmp_path / "c.pt")
    result = run("convert", tmp_path / "c.pt", "--output", tmp_path / "c.safetensors")
    assert result.returncode == 0, result.stdout + result.stderr
    with safe_open(tmp_path / "c.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "step": "3"}
    assert same_bits(load_file(tmp_path / "c.safetensors")["w"], model["w"])


def make_tree(root):
    (root / "voices" / "anna").mkdir(parents=True)
    (root / "voices" / "ben").mkdir(parents=True)
    (root / "hf").mkdir()
    write_plain(root / "voices" / "anna" / "model.pth", 0)
    write_trainer(root / "voices" / "ben" / "checkpoint_1000.pth", 1, 1000, 1, (1.0, 1.0))
    torch.save({"a": torch.ones(3)}, root / "hf" / "pytorch_model.bin")
    (root / "hf" / "config.json").write_text("{}")  # not a checkpoint: never picked up
    (root / "voices" / "ben" / "broken.pt").write_bytes(b"PK\x03\x04 not really a zip file")
    (root / "voices" / ".hidden.pth").write_bytes(b"ignored")


def outcomes(stdout: str) -> list[tuple[str, str, str]]:
    """(status, source, target or reason) for each per-file line."""
    parsed = []
    for line in stdout.splitlines():
        status, rest = line.split(" ", 1)
        if status == "converted":
            source, target = rest.split(" -> ", 1)
            parsed.append((status, source, target.split(" (", 1)[0]))
        else:
            source, reason = rest.split(": ", 1)
            parsed.append((status, source, reason))
    return parsed


def test_tree_is_mirrored_and_rerun_skips_complete_outputs(run, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_tree(src)
    first = run("convert", src, "--output", out)
    assert first.returncode == 1  # the broken file fails; the others are still converted
    got = outcomes(first.stdout)
    assert [g[:2] for g in got] == [("converted", str(src / "hf/pytorch_model.bin")),
                                    ("converted", str(src / "voices/anna/model.pth")),
                                    ("failed", str(src / "voices/ben/broken.pt")),
                                    ("converted", str(src / "voices/ben/checkpoint_1000.pth"))]
    assert [g[2] for g in got if g[0] == "converted"] == [
        str(out / "hf/model.safetensors"), str(out / "voices/anna/model.safetensors"),
        str(out / "voices/ben/checkpoint_1000.safetensors")]
    assert got[2][2].startswith("not a readable torch zip checkpoint")
    assert "3 converted, 0 skipped, 1 failed" in first.stderr
    anna = torch.load(src / "voices/anna/model.pth", weights_only=True)
    converted = load_file(out / "voices/anna/model.safetensors")
    assert set(converted) == set(anna) and all(same_bits(converted[k], v) for k, v in anna.items())

    (out / "voices/anna/model.safetensors").write_bytes(b"truncated")  # an incomplete output is redone
    (src / "voices/ben/broken.pt").unlink()
    second = run("convert", src, "--output", out)
    assert second.returncode == 0, second.stdout + second.stderr
    assert [g[:2] for g in outcomes(second.stdout)] == [("skipped", str(src / "hf/pytorch_model.bin")),
                                                         ("converted", str(src / "voices/anna/model.pth")),
                                                         ("skipped", str(src / "voices/ben/checkpoint_1000.pth"))]
    converted = load_file(out / "voices/anna/model.safetensors")
    assert all(same_bits(converted[k], v) for k, v in anna.items())


def test_sharded_output(run, tmp_path):
    write_plain(tmp_path / "m.pth", 0)
    result = run("convert", tmp_path / "m.pth", "--output", tmp_path / "sharded", "--shard-size", "300KB")
    assert result.returncode == 0, result.stdout + result.stderr
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    got = {}
    for shard in shards:
        got.update(load_file(tmp_path / "sharded" / shard))
    expected = torch.load(tmp_path / "m.pth", weights_only=True)
    assert set(got) == set(expected) and all(same_bits(got[k], v) for k, v in expected.items())
    again = run("convert", tmp_path / "m.pth", "--output", tmp_path / "sharded", "--shard-size", "300KB")
    assert again.stdout.startswith("skipped")


def test_hugging_face_shards_in_a_tree(run, tmp_path):
    """A `pytorch_model.bin.index.json` stands for its shards and converts as one checkpoint; with --shard-size
    Hugging Face's files shard straight into the mirrored directory, other files into one of their own."""
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "hf").mkdir(parents=True)
    parts = [{"a.weight": torch.randn(64, 64)}, {"b.weight": torch.randn(300), "b.bias": torch.randn(3)}]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        name = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save(part, src / "hf" / name)
        weight_map.update({k: name for k in part})
    (src / "hf" / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    torch.save({"model": {"w": torch.randn(10)}}, src / "run.v2.pth")
    result = run("convert", src, "--output", out, "--shard-size", "10KB", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [g[:3] for g in outcomes(result.stdout)] == [
        ("converted", str(src / "run.v2.pth"), str(out / "run_v2")),
        ("converted", str(src / "hf/pytorch_model.bin.index.json"), str(out / "hf"))]
    index = json.loads((out / "hf" / "model.safetensors.index.json").read_text())
    got = {}
    for shard in sorted(set(index["weight_map"].values())):
        got.update(load_file(out / "hf" / shard))
    expected = {**parts[0], **parts[1]}
    assert set(got) == set(expected) and all(same_bits(got[k], v) for k, v in expected.items())
    assert (out / "run_v2" / "model.safetensors").is_file()  # one shard: no index


def test_several_sources_into_a_directory(run, tmp_path):
    write_plain(tmp_path / "a.pth", 0)
    torch.save({"x": torch.ones(2)}, tmp_path / "b.bin")
    result = run("convert", tmp_path / "a.pth", tmp_path / "b.bin", "--output", tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["a.safetensors", "b.safetensors"]


@pytest.mark.parametrize("args, message", [
    (["SRC", "SRC2", "--output", "x.safetensors"], "give an output directory"),
    (["SRC", "--output", "x.safetensors", "--shard-size", "1GB"], "writes a directory of shards"),
    (["SRC", "--output", "x.pth"], "convert writes safetensors"),
    (["missing.pth", "--output", "out"], "no such file or directory"),
])
def test_refuses_what_cannot_mean_anything(run, tmp_path, args, message):
    write_plain(tmp_path / "a.pth", 0)
    write_plain(tmp_path / "b.pth", 1)
    args = [str(tmp_path / "a.pth") if a == "SRC" else str(tmp_path / "b.pth") if a == "SRC2" else
            str(tmp_path / a) if a.endswith((".safetensors", ".pth")) or a in ("out",) else a for a in args]
    result = run("convert", *args)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["a.pth", "b.pth"]


def test_batch_script(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "a" / "b").mkdir(parents=True)
    torch.save({"model": {"w": torch.randn(8)}, "step": 1}, src / "a" / "b" / "x.pth")
    torch.save({"w": torch.randn(3)}, src / "y.bin")
    env = {**os.environ, "STREAMMERGE": f"{sys.executable} -m streammerge"}
    script = ROOT / "scripts" / "convert_batch.sh"
    result = subprocess.run(["bash", script, src, out, "--max-ram", "512MiB"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "a" / "b" / "x.safetensors").is_file() and (out / "y.safetensors").is_file()
    log = (out / "convert.log").read_text()
    assert "2 converted, 0 skipped, 0 failed" in log and "exit status 0" in log


def test_files_without_weights_in_a_tree_are_skipped_but_refused_when_named(run, tmp_path):
    src, out = tmp_path / "run", tmp_path / "out"
    src.mkdir()
    torch.save({"w": torch.ones(4)}, src / "pytorch_model.bin")
    torch.save({"state": {0: {"exp_avg": torch.zeros(4)}}, "param_groups": [{"lr": 1e-4}]}, src / "optimizer.pt")
    torch.save({"learning_rate": 1e-4, "epochs": 3}, src / "training_args.bin")
    result = run("convert", src, "--output", out)
    assert result.returncode == 0, result.stdout + result.stderr
    got = {g[1]: g for g in outcomes(result.stdout)}
    assert got[str(src / "optimizer.pt")][0] == "skipped" and "no model weights" in got[str(src / "optimizer.pt")][2]
    assert got[str(src / "training_args.bin")][0] == "skipped"
    assert got[str(src / "pytorch_model.bin")][0] == "converted"
    assert not (out / "optimizer.safetensors").exists()
    named = run("convert", src / "optimizer.pt", "--output", out / "opt.safetensors")
    assert named.returncode == 1 and "failed" in named.stdout and "no tensors found" in named.stdout
