"""Merging into a .pth checkpoint: the classic script's container, loadable by torch and by Coqui."""

import json
import os

import pytest
import torch
import yaml
from xtts_helpers import (assert_same_state, coqui_load, run_in_process, seed_merge, write_plain,
                          write_trainer, xtts_module)

SEED_KEYS = {"model", "config", "step", "epoch", "model_loss"}

@pytest.fixture
def run(capsys):
    return lambda *args: run_in_process(capsys, *args)


def merge(runner, tmp_path, models, output="merged.pth", rules=None, extra=None):
    config = {"output": str(tmp_path / output), "models": models, **(extra or {})}
    if rules:
        config["rules"] = rules
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return runner("merge", path, "--quiet")


@pytest.fixture
def trainers(tmp_path):
    a, b = tmp_path / "news.pth", tmp_path / "audiobook.pth"
    write_trainer(a, seed=0, step=1000, epoch=3, losses=(1.0, 2.0), optimizer=True,
                  config={"model": "xtts", "audio": {"sample_rate": 22050}, "languages": ["en", "de"]})
    write_trainer(b, seed=1, step=2500, epoch=2, losses=(1.5, 2.25), optimizer=True,
                  config={"model": "xtts", "audio": {"sample_rate": 24000}})
    return a, b


def test_trainer_checkpoints_give_the_classic_container(cli, tmp_path, trainers):
    a, b = trainers
    result = merge(cli, tmp_path, [{"path": str(a), "weight": 3}, {"path": str(b), "weight": 2}],
                   rules=[{"match": "*.num_batches_tracked", "take": 0}],
                   extra={"max_ram": "256MiB"})
    assert result.returncode == 0, result.stderr
    got = torch.load(tmp_path / "merged.pth", weights_only=True)
    expected = seed_merge([a, b], [3, 2])
    assert set(got) == SEED_KEYS  # optimizer and scaler state dropped, date not kept
    assert {k: got[k] for k in SEED_KEYS - {"model"}} == {k: expected[k] for k in SEED_KEYS - {"model"}}
    assert type(got["step"]) is int and type(got["model_loss"]["train_loss"]) is float
    assert_same_state(got["model"], expected["model"])
    assert sorted(os.listdir(tmp_path)) == ["audiobook.pth", "merge.yaml", "merged.pth", "news.pth"]


def test_coqui_loader_accepts_the_result(run, tmp_path):
    """Trainer checkpoints carry `xtts.` names plus dvae/mel entries; Coqui strips and drops them itself."""
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    write_trainer(a, 0, 10, 1, (1.0, 1.0), prefix="xtts.", extras=True)
    write_trainer(b, 1, 20, 2, (2.0, 2.0), prefix="xtts.", extras=True)
    result = merge(run, tmp_path, [{"path": str(a), "weight": 0.6}, {"path": str(b), "weight": 0.4}])
    assert result.returncode == 0, result.stderr
    loaded = coqui_load(tmp_path / "merged.pth", xtts_module())
    expected = seed_merge([a, b], [0.6, 0.4], prefixes=["xtts.", "xtts."])
    assert_same_state(loaded, {k: v for k, v in expected["model"].items()
                               if k.split(".")[0] not in ("dvae",) and not k.startswith("torch_mel")})


def test_pickled_xtts_config_and_numpy_values(run, tmp_path):
    """The official release and older trainers pickle an XttsConfig object and numpy scalars; the .pth gets a
    plain dict and plain numbers, which torch.load(weights_only=True) accepts (one input is a legacy file)."""
    from ckpt_fixtures import XTTS_CONFIG_PLAIN, load_trusted, save_xtts_trainer

    paths = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        model = {f"xtts.gpt.{k}": torch.randn(7, 3, generator=g) for k in ("a", "b")}
        paths.append(save_xtts_trainer(tmp_path / f"m{i}.pth", model, legacy=bool(i), step=1000 * (i + 1),
                                       epoch=3 - i))
    result = merge(run, tmp_path, [{"path": str(p), "weight": w} for p, w in zip(paths, (0.25, 0.75))])
    assert result.returncode == 0, result.stderr
    got = torch.load(tmp_path / "merged.pth", weights_only=True)
    refs = [load_trusted(p) for p in paths]
    assert got["config"] == XTTS_CONFIG_PLAIN
    assert (got["step"], got["epoch"]) == (2000, 3) and type(got["step"]) is int
    assert got["model_loss"] == {k: sum(w * float(r["model_loss"][k]) for w, r in zip((0.25, 0.75), refs))
                                 for k in ("train_loss", "eval_loss")}
    for name in ("xtts.gpt.a", "xtts.gpt.b"):
        torch.testing.assert_close(got["model"][name], 0.25 * refs[0]["model"][name] + 0.75 * refs[1]["model"][name])


def test_tied_tensors_share_one_storage(run, tmp_path):
    paths = []
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        shared = torch.randn(16, 4, generator=g)
        state = {"embed.weight": shared, "head.weight": shared, "bias": torch.randn(4, generator=g)}
        paths.append(tmp_path / f"m{seed}.pth")
        torch.save({"model": state, "step": seed}, paths[-1])
    result = merge(run, tmp_path, [{"path": str(p)} for p in paths])
    assert result.returncode == 0, result.stderr
    got = torch.load(tmp_path / "merged.pth", weights_only=True)
    assert set(got) == {"model", "step"} and got["step"] == 1
    model = got["model"]
    assert model["embed.weight"].untyped_storage().data_ptr() == model["head.weight"].untyped_storage().data_ptr()
    ref = [torch.load(p, weights_only=True)["model"] for p in paths]
    torch.testing.assert_close(model["head.weight"], (ref[0]["head.weight"] + ref[1]["head.weight"]) / 2)


def test_plain_state_dicts_give_a_plain_state_dict(run, tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    write_plain(a, 0)
    write_plain(b, 1)
    result = merge(run, tmp_path, [{"path": str(a)}, {"path": str(b)}], output="out/merged.pt")
    assert result.returncode == 0, result.stderr
    got = torch.load(tmp_path / "out" / "merged.pt", weights_only=True)
    ref_a, ref_b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert set(got) == set(ref_a)
    assert_same_state(got, {k: (0.5 * v + 0.5 * ref_b[k]) if v.is_floating_point() else v for k, v in ref_a.items()})


def test_keys_only_some_inputs_have(run, tmp_path):
    """step/epoch: max over the inputs that have them; config: the first model that has one; model_loss: only
    when every input reports it."""
    plain, trainer = tmp_path / "plain.pth", tmp_path / "trainer.pth"
    write_plain(plain, 0)
    write_trainer(trainer, 1, step=700, epoch=4, losses=(1.0, 2.0), config={"model": "xtts"})
    result = merge(run, tmp_path, [{"path": str(plain)}, {"path": str(trainer)}])
    assert result.returncode == 0, result.stderr
    got = torch.load(tmp_path / "merged.pth", weights_only=True)
    assert set(got) == {"model", "config", "step", "epoch"}
    assert (got["config"], got["step"], got["epoch"]) == ({"model": "xtts"}, 700, 4)


def test_metadata_survives_a_trip_through_safetensors(run, tmp_path, trainers):
    """Converted checkpoints keep config/step/loss as JSON strings; merging them into .pth restores the values."""
    a, b = trainers
    for p in (a, b):
        result = run("convert", p, "--output", p.with_suffix(".safetensors"), "--quiet")
        assert result.returncode == 0, result.stdout + result.stderr
    result = merge(run, tmp_path, [{"path": str(a.with_suffix(".safetensors")), "weight": 0.6},
                                   {"path": str(b.with_suffix(".safetensors")), "weight": 0.4}],
                   rules=[{"match": "*.num_batches_tracked", "take": 0}])
    assert result.returncode == 0, result.stderr
    got = torch.load(tmp_path / "merged.pth", weights_only=True)
    expected = seed_merge([a, b], [0.6, 0.4])
    assert {k: got[k] for k in SEED_KEYS - {"model"}} == {k: expected[k] for k in SEED_KEYS - {"model"}}
    assert_same_state(got["model"], expected["model"])


def test_a_failed_merge_leaves_nothing(run, tmp_path):
    paths = []
    for seed in range(2):
        state = {"a": torch.randn(1000), "b": torch.randn(10)}
        if seed:
            state["b"][3] = float("nan")
        paths.append(tmp_path / f"m{seed}.pth")
        torch.save({"model": state}, paths[-1])
    result = merge(run, tmp_path, [{"path": str(p)} for p in paths], output="sub/dir/merged.pth")
    assert result.returncode == 1 and "NaN" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["m0.pth", "m1.pth", "merge.yaml"]


def test_dry_run_names_the_output_kind(run, tmp_path, trainers):
    a, b = trainers
    config = tmp_path / "merge.json"
    config.write_text(json.dumps({"output": str(tmp_path / "x.pth"), "models": [str(a), str(b)],
                                  "rules": [{"match": "*.num_batches_tracked", "take": 0}]}))
    result = run("merge", config, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "torch checkpoint (.pth)" in result.stdout
    assert not (tmp_path / "x.pth").exists()
