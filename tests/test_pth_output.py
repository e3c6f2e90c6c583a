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


def merge(runner, tmp_path, models, output="merged.pth", rules=None, extra=None, quiet=True):
    config = {"output": str(tmp_path / output), "models": models, **(extra or {})}
    if rules:
        config["rules"] = rules
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return runner("merge", path, *(["--quiet"] if quiet else []))


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


# -- metadata that cannot be kept as it is ---------------------------------------------------------------------

def _nested_json(depth: int) -> str:
    return '{"a": ' * depth + '"leaf"' + "}" * depth


def _depth(value) -> int:
    depth = 0
    while isinstance(value, dict) and value:
        value = next(iter(value.values()))
        depth += 1
    return depth


@pytest.mark.parametrize("config_depth", [3, 100, 900, 5000])
def test_huge_numbers_and_deep_configs_in_safetensors_metadata(run, tmp_path, config_depth):
    """safetensors metadata is JSON text: a 400-digit step (beyond any float), and a config nested up to
    thousands of levels (beyond Python's recursion limit) give a loadable .pth; what cannot be kept is left out
    and named in the summary, the rest is kept."""
    from safetensors.torch import save_file

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.ones(3)}, a, metadata={"step": "9" * 400, "epoch": "7", "config": _nested_json(config_depth)})
    save_file({"w": torch.zeros(3)}, b, metadata={"step": "12", "epoch": "1e999", "model_loss": "1e400"})
    result = merge(run, tmp_path, [{"path": str(a)}, {"path": str(b)}], quiet=False)
    assert result.returncode == 0, result.stderr
    got = torch.load(tmp_path / "merged.pth", weights_only=True)
    assert got["step"] == 12 and got["epoch"] == 7 and "model_loss" not in got
    torch.testing.assert_close(got["model"]["w"], torch.full((3,), 0.5))
    assert "models[0]'s step ('999" in result.stderr and "models[1]'s epoch" in result.stderr
    if config_depth <= 64:
        assert _depth(got["config"]) == config_depth
    elif config_depth < 1000:  # bounded as pickled metadata is: nesting beyond 64 levels becomes null
        assert 60 <= _depth(got["config"]) <= 66
    else:
        assert "config" not in got and "models[0]'s config" in result.stderr


def test_huge_numbers_and_deep_configs_in_pickled_metadata(run, tmp_path):
    """The same values pickled: step = 10**400, an int beyond 64 bits as epoch, a config nested 300 levels (as
    deep as torch.save goes)."""
    deep = "leaf"
    for _ in range(300):
        deep = {"a": deep}
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"model": {"w": torch.ones(3)}, "step": 10**400, "epoch": 2**70, "config": deep}, a)
    torch.save({"model": {"w": torch.zeros(3)}, "step": 5, "epoch": 3}, b)
    result = merge(run, tmp_path, [{"path": str(a)}, {"path": str(b)}], quiet=False)
    assert result.returncode == 0, result.stderr
    got = torch.load(tmp_path / "merged.pth", weights_only=True)
    assert (got["step"], got["epoch"]) == (5, 3)
    assert 60 <= _depth(got["config"]) <= 66
    assert "models[0]'s step" in result.stderr and "models[0]'s epoch" in result.stderr


# -- pth_container: the layout of the .pth ---------------------------------------------------------------------

def test_pth_container_coqui_wraps_bare_state_dicts(run, tmp_path):
    """Two bare state dicts in: `auto` gives a bare state dict (and says how to get Coqui's layout); `coqui`
    gives {"model": ...}, which Coqui's loader reads."""
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    write_plain(a, 0)
    write_plain(b, 1)
    ref_a, ref_b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    expected = {k: (0.5 * v + 0.5 * ref_b[k]) if v.is_floating_point() else v for k, v in ref_a.items()}
    result = merge(run, tmp_path, [{"path": str(a)}, {"path": str(b)}], output="auto.pth", quiet=False)
    assert result.returncode == 0, result.stderr
    assert "bare state dict (pth_container: auto; `pth_container: coqui`" in result.stderr
    assert set(torch.load(tmp_path / "auto.pth", weights_only=True)) == set(ref_a)
    result = merge(run, tmp_path, [{"path": str(a)}, {"path": str(b)}], output="coqui.pth",
                   extra={"pth_container": "coqui"}, quiet=False)
    assert result.returncode == 0, result.stderr
    assert "{'model': state dict} (pth_container: coqui)" in result.stderr
    got = torch.load(tmp_path / "coqui.pth", weights_only=True)
    assert set(got) == {"model"}
    assert_same_state(got["model"], expected)
    assert_same_state(coqui_load(tmp_path / "coqui.pth", xtts_module()), expected)


def test_pth_container_coqui_and_plain_on_trainer_checkpoints(run, tmp_path, trainers):
    """Lightning-style `state_dict` inputs still give Coqui's `model` key; `plain` gives the state dict alone and
    says what it left out; the summary names the layout in both cases."""
    a, b = trainers
    for path in (a, b):
        ckpt = torch.load(path, weights_only=True)
        torch.save({"state_dict": ckpt.pop("model"), **ckpt}, path)
    models = [{"path": str(a), "weight": 3}, {"path": str(b), "weight": 2}]
    rules = [{"match": "*.num_batches_tracked", "take": 0}]
    result = merge(run, tmp_path, models, output="coqui.pth", rules=rules, extra={"pth_container": "coqui"}, quiet=False)
    assert result.returncode == 0, result.stderr
    assert "{'model': state dict, 'config', 'step', 'epoch', 'model_loss'} (pth_container: coqui)" in result.stderr
    got = torch.load(tmp_path / "coqui.pth", weights_only=True)
    assert set(got) == SEED_KEYS and (got["step"], got["epoch"]) == (2500, 3)
    result = merge(run, tmp_path, models, output="plain.pth", rules=rules, extra={"pth_container": "plain"}, quiet=False)
    assert result.returncode == 0, result.stderr
    assert "bare state dict (pth_container: plain)" in result.stderr
    assert "leaves out the inputs' config, step, epoch, model_loss" in result.stderr
    plain = torch.load(tmp_path / "plain.pth", weights_only=True)
    assert set(plain) == set(got["model"])
    assert_same_state(plain, got["model"])
    result = merge(run, tmp_path, models, output="auto.pth", rules=rules)
    assert result.returncode == 0, result.stderr
    assert set(torch.load(tmp_path / "auto.pth", weights_only=True)) == {"state_dict"} | SEED_KEYS - {"model"}


@pytest.mark.parametrize("value", ["Coqui", "model", 1, None, ["coqui"]])
def test_pth_container_refuses_other_values(run, tmp_path, value):
    a = tmp_path / "a.pth"
    write_plain(a, 0)
    result = merge(run, tmp_path, [{"path": str(a)}], extra={"pth_container": value})
    assert result.returncode == 1
    assert "pth_container: must be one of auto, coqui, plain" in result.stderr and "Traceback" not in result.stderr


def test_pth_container_beside_a_mergekit_config(run, tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    write_plain(a, 0)
    write_plain(b, 1)
    config = tmp_path / "mergekit.yml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "pth_container": "coqui",
                                      "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in (a, b)]}))
    result = run("merge", config, tmp_path / "merged.pth", "--quiet")
    assert result.returncode == 0, result.stderr
    assert set(torch.load(tmp_path / "merged.pth", weights_only=True)) == {"model"}
