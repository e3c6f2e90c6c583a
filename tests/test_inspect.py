"""`streammerge inspect PATH [--json]`."""

import json
import math
import os

import pytest
import torch

import synth
from ckpt_fixtures import Evil, save_legacy, save_xtts_trainer, small_state_dict, touch_command
from safety_support import run_main  # the command line's code path, in this process
from streammerge.inspect import inspect_checkpoint


@pytest.fixture(scope="module")
def xtts_trainer(tmp_path_factory):
    return synth.write_models(tmp_path_factory.mktemp("xtts"), 1, "trainer", shrink=16)[0]


def test_inspect_json_lists_every_xtts_tensor(cli, xtts_trainer):
    result = cli("inspect", xtts_trainer, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    entries = synth.xtts_entries(shrink=16)
    assert report["format"] == "torch-zip" and report["container"] == "model"
    assert len(report["tensors"]) == report["count"] == 963
    assert report["tensors"] == {n: {"shape": list(s), "dtype": str(d).removeprefix("torch."),
                                     "bytes": math.prod(s) * d.itemsize} for n, s, d in entries}
    assert report["total_bytes"] == sum(math.prod(s) * d.itemsize for _, s, d in entries)
    assert report["parameters"] == sum(math.prod(s) for _, s, d in entries)
    assert report["dtypes"] == {"float32": 926, "int64": 37} and report["tied"] == []
    meta = report["metadata"]
    assert meta["step"] == 1000 and meta["epoch"] == 1 and meta["model_loss"] == {"train_loss": 1.0, "eval_loss": 2.0}
    assert meta["config"] == {"model": "xtts", "audio": {"sample_rate": 22050}}


def test_inspect_text(xtts_trainer):
    result = run_main("inspect", xtts_trainer)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "torch-zip, weights under 'model'" in out
    assert "gpt.gpt.h.0.attn.c_attn.weight" in out and "963 (926 float32, 37 int64)" in out
    assert "step: 1000" in out


def test_inspect_pickled_config_tied_and_training_state(tmp_path):
    sd = small_state_dict(prefix="xtts.")
    path = save_xtts_trainer(tmp_path / "model.pth", sd)
    report = inspect_checkpoint(path)
    assert report["format"] == "torch-zip" and report["container"] == "model"
    assert report["tied"] == [["xtts.embed.weight", "xtts.head.weight"]]
    # shared bytes once: the tied pair counts once
    unique = {k: v for k, v in sd.items() if k != "xtts.head.weight"}
    assert report["total_bytes"] == sum(v.nbytes for v in unique.values())
    assert report["parameters"] == sum(v.numel() for v in unique.values())
    meta = report["metadata"]
    assert meta["config"]["__class__"] == "TTS.tts.configs.xtts_config.XttsConfig"
    assert meta["optimizer"]["tensors"] == 9 and "state" not in meta["optimizer"]
    json.dumps(report)  # JSON-able throughout


def test_inspect_text_describes_records_and_summaries(tmp_path):
    path = save_xtts_trainer(tmp_path / "model.pth", small_state_dict(prefix="xtts."), legacy=True)
    result = run_main("inspect", path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "torch-legacy, weights under 'model'" in out
    assert "XttsConfig object (TTS.tts.configs.xtts_config.XttsConfig, kept as data, never imported)" in out
    assert "optimizer: training state (never merged): 9 tensors" in out and "lr=5e-06" in out
    assert "tied: 1 group(s) sharing storage: xtts.embed.weight = xtts.head.weight" in out


def test_inspect_safetensors_and_sharded(tmp_path):
    path = tmp_path / "m.safetensors"
    synth.write_safetensors(path, seed=0, shrink=32)
    report = json.loads(run_main("inspect", path, "--json").stdout)
    assert report["format"] == "safetensors" and report["container"] == "" and report["count"] == 963


def test_inspect_refuses_malicious_file(cli, tmp_path):
    marker = tmp_path / "marker"
    path = save_legacy({"model": small_state_dict(), "x": Evil(os.system, touch_command(marker))}, tmp_path / "e.pt")
    result = cli("inspect", path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert str(path) in result.stderr and "system" in result.stderr
    assert not marker.exists()


def test_inspect_ambiguous_container_and_key_option(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"model": small_state_dict(0), "ema": small_state_dict(1)}, path)
    result = run_main("inspect", path)
    assert result.returncode == 1 and "state_dict_key" in result.stderr and "Traceback" not in result.stderr
    result = run_main("inspect", path, "--state-dict-key", "ema", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["container"] == "ema"
