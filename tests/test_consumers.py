"""Merged output loads in the programs that use it."""

import json
import os

import pytest
import torch

from helpers import merge_in_process

transformers = pytest.importorskip("transformers")


def test_transformers_loads_sharded_merge(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64)
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(config)
        model.save_pretrained(tmp_path / f"m{seed}")
        models.append(model.state_dict())
    out = tmp_path / "merged"
    merge_in_process({"output": str(out), "shard_size": "30KB",
                      "models": [{"path": str(tmp_path / "m0"), "weight": 0.3},
                                 {"path": str(tmp_path / "m1"), "weight": 0.7}]})
    assert len(list(out.glob("model-*.safetensors"))) > 1
    (out / "config.json").write_text((tmp_path / "m0" / "config.json").read_text())
    merged = transformers.GPT2LMHeadModel.from_pretrained(out).state_dict()
    for name, value in models[0].items():
        if value.is_floating_point() and name != "lm_head.weight":
            torch.testing.assert_close(merged[name], 0.3 * value + 0.7 * models[1][name], msg=name)
    assert torch.equal(merged["lm_head.weight"], merged["transformer.wte.weight"])  # still tied
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(os.path.getsize(p) for p in out.glob("model-*.safetensors")) - sum(
        8 + int.from_bytes(p.read_bytes()[:8], "little") for p in out.glob("model-*.safetensors"))
