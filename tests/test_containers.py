"""Where the weights sit: found automatically in the containers people have, or named by state_dict_key."""

import json
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file

from ckpt_fixtures import (XTTS_CONFIG_PLAIN, fairseq_ckpt, lightning_ckpt, load_trusted, save_legacy,
                           save_xtts_trainer, small_state_dict)
from streammerge.config import parse_config
from streammerge.engine import merge
from streammerge.errors import CheckpointError
from streammerge.io import open_checkpoint
from streammerge.io.containers import find_state_dict, plain_config


def names(sd) -> list:
    return sorted(sd)


@pytest.fixture(params=["zip", "legacy"])
def save(request):
    def write(obj, path):
        return save_legacy(obj, path) if request.param == "legacy" else (torch.save(obj, path), path)[1]
    return write


def test_lightning_ckpt(tmp_path, save):
    sd = small_state_dict()
    path = save(lightning_ckpt(sd), tmp_path / "last.ckpt")
    with open_checkpoint(path) as ckpt:
        assert ckpt.container == "state_dict"
        assert names(ckpt.tensors) == sorted("model." + k for k in sd)
        meta = ckpt.metadata
        assert meta["hyper_parameters"] == {"lr": 1e-4, "hidden": 8} and meta["global_step"] == 5000
        assert meta["optimizer_states"]["__summary__"].startswith("training state")
        assert meta["optimizer_states"]["tensors"] == 2 and meta["optimizer_states"]["tensor_bytes"] == 1600
        assert meta["optimizer_states"]["param_groups"] == [{"lr": 1e-4}]
        assert "state_dict" not in meta
        json.dumps(meta, allow_nan=False)


def test_fairseq_ckpt_with_namespace_args(tmp_path, save):
    sd = small_state_dict()
    path = save(fairseq_ckpt(sd), tmp_path / "checkpoint_best.pt")
    with open_checkpoint(path) as ckpt:
        assert ckpt.container == "model" and names(ckpt.tensors) == names(sd)
        assert plain_config(ckpt.metadata["args"]) == {"arch": "transformer", "lr": [0.0005], "max_tokens": 4096,
                                                       "fp16": True}
        assert ckpt.metadata["extra_state"]["val_loss"] == 3.25
        assert ckpt.metadata["last_optimizer_state"]["tensors"] == 1
        json.dumps(ckpt.metadata, allow_nan=False)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_coqui_trainer_with_pickled_config(tmp_path, legacy):
    sd = small_state_dict(prefix="xtts.")
    sd["dvae.codebook"] = torch.randn(4, 4)
    path = save_xtts_trainer(tmp_path / f"model{legacy}.pth", sd, legacy=legacy)
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == ("torch-legacy" if legacy else "torch-zip")
        assert ckpt.container == "model" and names(ckpt.tensors) == names(sd)
        meta = ckpt.metadata
        assert plain_config(meta["config"]) == XTTS_CONFIG_PLAIN
        assert meta["step"] == 1000 and type(meta["step"]) is int
        assert meta["model_loss"] == {"train_loss": 1.25, "eval_loss": 2.5}
        assert meta["optimizer"]["tensors"] == 9 and meta["optimizer"]["param_groups"][0]["lr"] == 5e-6
        assert meta["scheduler"] == {"last_epoch": 3, "_last_lr": [5e-6]}  # no tensors: kept as is
        assert meta["scaler"] == {"scale": 65536.0, "_growth_tracker": 12}
        json.dumps(meta, allow_nan=False)


@pytest.mark.parametrize("wrap, container", [
    (lambda sd: sd, ""),
    (lambda sd: {"model": sd}, "model"),
    (lambda sd: {"state_dict": sd, "epoch": 3}, "state_dict"),
    (lambda sd: {"module": sd}, "module"),
    (lambda sd: {"model": {"state_dict": sd, "version": 2}, "step": 3}, "model.state_dict"),
    (lambda sd: {"net.v2": {"weights": sd}}, "net.v2.weights"),
])
def test_nested_containers(tmp_path, save, wrap, container):
    sd = small_state_dict()
    path = save(wrap(sd), tmp_path / "c.pt")
    with open_checkpoint(path) as ckpt:
        assert ckpt.container == container and names(ckpt.tensors) == names(sd)
    with open_checkpoint(path, state_dict_key=container or None) as ckpt:
        assert names(ckpt.tensors) == names(sd)


def test_optimizer_state_is_never_chosen_even_when_larger(tmp_path, save):
    model = {"w": torch.randn(4)}
    optimizer = {"state": {0: {"exp_avg": torch.zeros(1000), "exp_avg_sq": torch.zeros(1000)}},
                 "param_groups": [{"lr": 0.1, "params": [0]}]}
    flat_optimizer = {f"exp_avg.{i}": torch.zeros(1000) for i in range(3)}  # looks exactly like a state dict
    path = save({"model_state_dict": model, "optimizer_state_dict": optimizer, "optimizer": flat_optimizer,
                 "scaler": {"scale": torch.tensor(1024.0)}}, tmp_path / "c.pt")
    with open_checkpoint(path) as ckpt:
        assert ckpt.container == "model_state_dict" and list(ckpt.tensors) == ["w"]
        assert ckpt.metadata["optimizer"]["tensors"] == 3


def test_optimizer_state_under_any_key_is_recognised_by_its_shape(tmp_path, save):
    """A training script may store optimizer.state_dict() under a key of its own choosing ("adam_state"):
    {"state": ..., "param_groups": [...]} is summarised like any training state, and never chosen."""
    model = {"w": torch.randn(4)}
    optimizer = {"state": {140178894849152: {"exp_avg": torch.zeros(1000), "exp_avg_sq": torch.zeros(1000),
                                             "step": 7}},
                 "param_groups": [{"lr": 1e-4, "params": [140178894849152]}]}
    path = save({"step": 7, "model_state": model, "adam_state": optimizer}, tmp_path / "c.pt")
    with open_checkpoint(path) as ckpt:
        assert ckpt.container == "model_state" and list(ckpt.tensors) == ["w"]
        assert ckpt.metadata["step"] == 7
        summary = ckpt.metadata["adam_state"]
        assert summary["__summary__"].startswith("training state") and summary["tensors"] == 2
        assert summary["param_groups"] == [{"lr": 1e-4}]


def test_largest_mapping_wins(tmp_path, save):
    sd = small_state_dict()
    path = save({"ema": {"w": torch.zeros(3)}, "model": sd, "buffers": {"mel_stats": torch.ones(2)}}, tmp_path / "c")
    with open_checkpoint(path) as ckpt:
        assert ckpt.container == "model"
        assert ckpt.metadata["ema"] == {"w": {"tensor": [3], "dtype": "float32"}}


def test_equal_candidates_are_ambiguous(tmp_path, save):
    path = save({"model": small_state_dict(0), "model_ema": small_state_dict(1), "step": 3}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and "'model'" in message and "'model_ema'" in message
    assert "state_dict_key" in message
    with open_checkpoint(path, state_dict_key="model_ema") as ckpt:
        assert ckpt.container == "model_ema"
        assert "model" in ckpt.metadata  # the other candidate stays as (described) metadata


def test_same_state_dict_under_two_keys_is_not_ambiguous(tmp_path, save):
    sd = small_state_dict()
    path = save({"model": sd, "state_dict": sd}, tmp_path / "c.pt")
    with open_checkpoint(path) as ckpt:
        assert ckpt.container == "model" and names(ckpt.tensors) == names(sd)


def test_missing_state_dict_key_lists_keys_at_that_level(tmp_path, save):
    path = save({"model": {"state_dict": small_state_dict(), "version": 2}, "step": 1}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(path, state_dict_key="model.weights")
    message = str(err.value)
    assert str(path) in message and "'model.weights' does not exist" in message
    assert "'model' holds" in message and "state_dict (" in message and "version (int)" in message
    with pytest.raises(CheckpointError, match="the top level holds the keys"):
        open_checkpoint(path, state_dict_key="weights")
    with pytest.raises(CheckpointError, match="holds no tensors"):
        open_checkpoint(path, state_dict_key="step")
    with pytest.raises(CheckpointError, match="not a mapping"):
        open_checkpoint(path, state_dict_key="step.x")


def test_no_tensors_names_what_was_found(tmp_path, save):
    path = save({"config": {"lr": 1}, "step": 3}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(path)
    assert str(path) in str(err.value) and "config (dict)" in str(err.value) and "step (int)" in str(err.value)


def test_optimizer_only_file_says_so(tmp_path, save):
    path = save({"optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": []}}, tmp_path / "o.pt")
    with pytest.raises(CheckpointError, match="only optimizer/scheduler state holds tensors"):
        open_checkpoint(path)


def test_non_tensor_entries_of_the_chosen_mapping_stay_in_metadata():
    sd = {"w": torch.zeros(2), "_extra_state": "v3"}
    tensors, container, rest = find_state_dict({"model": sd, "step": 1}, "x")
    assert list(tensors) == ["w"] and container == "model" and rest == {"model": {"_extra_state": "v3"}, "step": 1}


def test_plain_config_strips_markers():
    value = {"__class__": "a.Cfg", "lr": 1.0, "audio": {"__class__": "a.Audio", "sr": 22050},
             "items": [{"__class__": "a.Item", "__args__": ["x"]}, {"__global__": "a.func"}],
             "sub": {"__class__": "a.Dict", "__items__": {"k": 1}}, "raw": {"__class__": "a.Raw", "__state__": [1]}}
    assert plain_config(value) == {"lr": 1.0, "audio": {"sr": 22050}, "items": ["x", "a.func"], "sub": {"k": 1},
                                   "raw": [1]}
    assert plain_config({"a": [1, 2.5, "s", None, True]}) == {"a": [1, 2.5, "s", None, True]}


def test_dataparallel_prefix_is_a_rename(tmp_path):
    """A DataParallel checkpoint (`module.` prefix, legacy format) merges with a plain one through `rename`."""
    gen = torch.Generator().manual_seed(0)
    a = OrderedDict((k, torch.randn(6, 5, generator=gen)) for k in ("enc.weight", "dec.weight"))
    b = OrderedDict((k, torch.randn(6, 5, generator=gen)) for k in ("enc.weight", "dec.weight"))
    save_legacy({"state_dict": OrderedDict(("module." + k, v) for k, v in a.items())}, tmp_path / "dp.pth")
    torch.save({"model": b, "config": {"x": 1}}, tmp_path / "plain.pth")
    config = parse_config({
        "output": str(tmp_path / "out.safetensors"),
        "models": [{"path": str(tmp_path / "dp.pth"), "weight": 0.25,
                    "rename": [{"pattern": "^module\\.", "replace": ""}]},
                   {"path": str(tmp_path / "plain.pth"), "weight": 0.75}],
    })
    merge(config, quiet=True)
    out = load_file(tmp_path / "out.safetensors")
    assert sorted(out) == ["dec.weight", "enc.weight"]
    for k in a:
        assert torch.allclose(out[k], 0.25 * a[k] + 0.75 * b[k], atol=1e-6)


def test_xtts_prefix_and_pickled_config_merge(tmp_path):
    """Two Coqui trainer files (pickled XttsConfig, numpy losses, optimizer) merge like plain state dicts."""
    gen = torch.Generator().manual_seed(1)
    sds = [OrderedDict((f"xtts.gpt.{k}", torch.randn(7, 3, generator=gen)) for k in ("a", "b")) for _ in range(2)]
    paths = [save_xtts_trainer(tmp_path / f"m{i}.pth", sd, legacy=bool(i)) for i, sd in enumerate(sds)]
    config = parse_config({"output": str(tmp_path / "out.safetensors"),
                           "models": [{"path": str(p), "weight": 1.0} for p in paths],
                           "rename": [{"pattern": "^xtts\\.", "replace": ""}]})
    merge(config, quiet=True)
    out = load_file(tmp_path / "out.safetensors")
    refs = [load_trusted(p)["model"] for p in paths]
    for k in ("a", "b"):
        name = f"gpt.{k}"
        assert torch.allclose(out[name], (refs[0]["xtts." + name] + refs[1]["xtts." + name]) / 2, atol=1e-6)
