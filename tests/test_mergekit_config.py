"""mergekit YAML configs: parameters resolved per tensor as mergekit does, unsupported keys refused by name."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

import compare_mergekit
from compare_mergekit import build_models, tensor_files
from streammerge.config import load_config
from streammerge.errors import ConfigError
from streammerge.mergekit_config import evaluate, layer_positions
from safetensors import safe_open

LAYERS = 3


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("hf"), vocab=64, hidden=16, inter=24, layers=LAYERS)


def load_dir(directory):
    out = {}
    for name, path in tensor_files(directory).items():
        with safe_open(path, "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def write(tmp_path, config) -> str:
    path = tmp_path / "mergekit.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_gradients_interpolate_over_layers_and_filters_match_substrings():
    assert evaluate([0.0, 1.0], "x", 0.5) == 0.5
    assert evaluate([0.0, 1.0, 0.0], "x", 0.75) == 0.5
    assert evaluate([{"filter": "mlp", "value": 2}, {"value": 3}], "model.layers.0.mlp.up_proj.weight", 0) == 2
    assert evaluate([{"filter": "mlp", "value": 2}, {"value": 3}], "model.norm.weight", 0) == 3
    assert evaluate([{"filter": "mlp", "value": 2}], "model.norm.weight", 0) is None
    names = ["model.embed_tokens.weight", "model.layers.0.a", "model.layers.1.a", "model.layers.2.a", "model.norm.w"]
    assert list(layer_positions(names).values()) == [0.0, 0.0, 0.5, 1.0, 0.0]


def test_linear_gradient_and_filter_through_the_cli(tmp_path, hf_models, cli):
    a, b = hf_models["a"], hf_models["b"]
    config = {"merge_method": "linear", "dtype": "float32", "parameters": {"normalize": False}, "models": [
        {"model": str(a), "parameters": {"weight": [1.0, 0.0]}},
        {"model": str(b), "parameters": {"weight": [{"filter": "mlp", "value": 2.0}, {"value": [0.0, 1.0]}]}}]}
    result = cli("merge", write(tmp_path, config), "--output", tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    out, ta, tb = load_dir(tmp_path / "out"), load_dir(a), load_dir(b)
    for name, value in out.items():
        t = layer_positions(list(out))[name]
        wb = 2.0 if "mlp" in name else t
        torch.testing.assert_close(value, ta[name] * (1 - t) + tb[name] * wb, rtol=1e-6, atol=1e-7)


def test_task_vector_config_uses_base_model_and_per_model_density(tmp_path, hf_models):
    config = {"merge_method": "ties", "base_model": str(hf_models["base"]), "models": [
        {"model": str(hf_models["base"])},  # mergekit configs often list the base too
        {"model": str(hf_models["a"]), "parameters": {"weight": 0.5, "density": [0.2, 0.8]}},
        {"model": str(hf_models["b"]), "parameters": {"weight": 0.5, "density": 0.5}}],
        "parameters": {"normalize": True}, "dtype": "bfloat16"}
    merge = load_config(write(tmp_path, config))
    assert merge.method.name == "ties" and str(merge.base.path) == str(hf_models["base"])
    assert [str(m.path) for m in merge.models] == [str(hf_models["a"]), str(hf_models["b"])]
    assert merge.dtype == torch.float32 and merge.out_dtype == torch.bfloat16
    densities = {tuple(r.model_params["density"]) for r in merge.rules}
    assert (0.5, 0.5) in densities and (0.8, 0.5) in densities  # layer 1 (t = 0.5) and layer 2 (t = 1)


def test_slerp_base_model_is_t_zero(tmp_path, hf_models, cli):
    a, b = str(hf_models["a"]), str(hf_models["b"])
    config = {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}],
              "parameters": {"t": 0.0}}
    assert cli("merge", write(tmp_path, config), "-o", tmp_path / "out", "-q").returncode == 0
    out, ta = load_dir(tmp_path / "out"), load_dir(hf_models["a"])
    assert all(torch.equal(out[k], ta[k]) for k in ta)


def test_single_whole_model_slice_is_accepted(tmp_path, hf_models):
    a, b = str(hf_models["a"]), str(hf_models["b"])
    config = {"merge_method": "slerp", "base_model": a, "parameters": {"t": [0.0, 1.0]},
              "slices": [{"sources": [{"model": a, "layer_range": [0, LAYERS]},
                                      {"model": b, "layer_range": [0, LAYERS]}]}]}
    merge = load_config(write(tmp_path, config))
    assert merge.method.name == "slerp" and len(merge.models) == 2


@pytest.mark.parametrize("change, message", [
    ({"slices": [{"sources": []}, {"sources": []}], "models": None}, "slices"),
    ({"merge_method": "add_difference"}, "'add_difference' is not available"),  # streammerge's own
    ({"frobnicate": 1}, "frobnicate"),
])
def test_unsupported_keys_are_refused_by_name(tmp_path, hf_models, change, message):
    config = {"merge_method": "linear", "models": [{"model": str(hf_models["a"])}, {"model": str(hf_models["b"])}]}
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, config))


@pytest.mark.parametrize("model, message", [
    ("{a}+adapters/lora", r"\(LoRA adapter\).*'adapters/lora'"),
    ("no/such/dir", "neither a local file or directory nor a Hugging Face Hub id"),
])
def test_model_references_streammerge_cannot_read_are_refused(tmp_path, hf_models, model, message, monkeypatch):
    # Offline, with an empty cache: the adapter 'adapters/lora' is shaped like a Hub id, and online its refusal
    # would wait for the network to fail (tens of seconds without one) rather than test the reference.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    config = {"merge_method": "linear", "models": [{"model": model.format(a=hf_models["a"])},
                                                    {"model": str(hf_models["b"])}]}
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, config))


@pytest.mark.parametrize("change, warning", [
    ({"parameters": {"normalize": True, "t": 0.5}},
     "parameters: 't' is ignored: it is not a parameter of method 'ties'"),
    ({"models": [{"model": "{a}", "parameters": {"normalize": False, "weight": 0.3}}]},
     "models[0]: 'normalize' is ignored: it is a parameter of the whole merge"),
])
def test_parameters_mergekit_ignores_are_warnings(tmp_path, hf_models, change, warning):
    config = {"merge_method": "ties", "base_model": str(hf_models["base"]),
              "models": [{"model": str(hf_models["a"]), "parameters": {"weight": 0.3}}]}
    config.update(change)
    config["models"][0]["model"] = config["models"][0]["model"].format(a=hf_models["a"])
    merge = load_config(write(tmp_path, config))
    assert len(merge.warnings) == 1 and warning in merge.warnings[0], merge.warnings
    assert merge.params["normalize"] is True and merge.models[0].params["weight"] == 0.3


@pytest.mark.skipif(not os.environ.get("MERGEKIT_YAML"), reason="set MERGEKIT_YAML to a mergekit-yaml executable")
def test_same_tensors_as_mergekit(tmp_path):
    assert compare_mergekit.main(["--small", "--workdir", str(tmp_path), "--mergekit",
                                  os.environ["MERGEKIT_YAML"]]) == 0


def test_only_the_base_listed_is_refused(tmp_path, hf_models):
    config = {"merge_method": "ties", "base_model": str(hf_models["base"]), "models": [{"model": str(hf_models["base"])}]}
    with pytest.raises(ConfigError, match="no model besides base_model"):
        load_config(write(tmp_path, config))
