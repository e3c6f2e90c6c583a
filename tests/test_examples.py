"""Each bundled XTTS example config, run through the CLI on small synthetic checkpoints."""

from pathlib import Path

import pytest
import torch
import yaml
from xtts_helpers import (assert_same_state, coqui_load, run_in_process, seed_merge, write_plain,
                          write_trainer, xtts_module)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

@pytest.fixture
def run(capsys):
    return lambda *args: run_in_process(capsys, *args)


def run_example(run, tmp_path, name: str, inputs: list[Path]) -> dict:
    """Run examples/NAME with its model paths and output replaced; return the loaded output."""
    config = yaml.safe_load((EXAMPLES / name).read_text())
    assert len(config["models"]) == len(inputs)
    for model, path in zip(config["models"], inputs):
        model["path"] = str(path)
    config["output"] = str(tmp_path / "merged" / Path(config["output"]).name)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = run("merge", path, "--quiet")
    assert result.returncode == 0, result.stderr
    return torch.load(config["output"], weights_only=True)


def two_finetunes(tmp_path) -> list[Path]:
    paths = [tmp_path / "news.pth", tmp_path / "audiobook.pth"]
    write_trainer(paths[0], 0, 4000, 8, (0.9, 1.1), config={"model": "xtts", "run_name": "news"})
    write_trainer(paths[1], 1, 6000, 5, (0.7, 1.3), config={"model": "xtts", "run_name": "audiobook"})
    return paths


def test_two_finetunes(run, tmp_path):
    paths = two_finetunes(tmp_path)
    got = run_example(run, tmp_path, "xtts_two_finetunes.yaml", paths)
    expected = seed_merge(paths, [0.6, 0.4])
    assert set(got) == {"model", "config", "step", "epoch", "model_loss"}
    assert {k: v for k, v in got.items() if k != "model"} == {k: v for k, v in expected.items() if k != "model"}
    assert_same_state(got["model"], expected["model"])
    coqui_load(tmp_path / "merged" / "xtts_news_audiobook.pth", xtts_module())


def kept_encoder(name: str) -> bool:
    return "gpt.conditioning_encoder." in name or "hifigan_decoder.speaker_encoder." in name


def test_keep_encoder(run, tmp_path):
    paths = two_finetunes(tmp_path)
    got = run_example(run, tmp_path, "xtts_keep_encoder.yaml", paths)
    expected = seed_merge(paths, [0.6, 0.4], take_first=kept_encoder)
    assert {k: v for k, v in got.items() if k != "model"} == {k: v for k, v in expected.items() if k != "model"}
    assert_same_state(got["model"], expected["model"])
    first = torch.load(paths[0], weights_only=True)["model"]
    name = "hifigan_decoder.speaker_encoder.conv1.weight"
    assert torch.equal(got["model"][name], first[name])


def test_trainer_plus_plain(run, tmp_path):
    trainer, plain = tmp_path / "checkpoint_5000.pth", tmp_path / "model.pth"
    write_trainer(trainer, 0, 5000, 3, (1.0, 2.0), prefix="xtts.", extras=True, optimizer=True,
                  config={"model": "xtts"})
    write_plain(plain, 1)
    got = run_example(run, tmp_path, "xtts_trainer_plus_plain.yaml", [trainer, plain])
    # The plain model has no step/loss: the output keeps what exists and leaves the loss out.
    assert set(got) == {"model", "config", "step", "epoch"}
    assert (got["config"], got["step"], got["epoch"]) == ({"model": "xtts"}, 5000, 3)
    a = torch.load(trainer, weights_only=True)["model"]
    b = torch.load(plain, weights_only=True)
    expected = {k: (0.5 * a["xtts." + k] + 0.5 * v) if v.is_floating_point() else a["xtts." + k]
                for k, v in b.items()}
    assert_same_state(got["model"], expected)
    coqui_load(tmp_path / "merged" / "xtts_trainer_plus_base.pth", xtts_module())


@pytest.mark.parametrize("example", ["xtts_keep_encoder.yaml", "xtts_two_finetunes.yaml"])
def test_examples_on_trainer_checkpoints(run, tmp_path, example):
    """Trainer checkpoints (names under `xtts.`, plus the trainer's dvae and mel modules): every rule of the
    example matches something, and the result is what the example says."""
    paths = [tmp_path / "news.pth", tmp_path / "audiobook.pth"]
    for i, path in enumerate(paths):
        write_trainer(path, i, 4000 + i, 8 - i, (0.9, 1.1), prefix="xtts.", extras=True, optimizer=True,
                      config={"model": "xtts"})
    config = yaml.safe_load((EXAMPLES / example).read_text())
    for model, path in zip(config["models"], paths):
        model["path"] = str(path)
    config["output"] = str(tmp_path / "out.pth")
    config_path = tmp_path / example
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    plan = run("merge", config_path, "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "matches no tensor" not in plan.stdout, plan.stdout
    got = run_example(run, tmp_path, example, paths)
    take = kept_encoder if example == "xtts_keep_encoder.yaml" else (lambda name: False)
    expected = seed_merge(paths, [0.6, 0.4], take_first=take)
    assert_same_state(got["model"], expected["model"])
    assert any("dvae." in k for k in got["model"])  # as the example's comment says: kept unless dropped
    output_name = Path(yaml.safe_load((EXAMPLES / example).read_text())["output"]).name
    coqui_load(tmp_path / "merged" / output_name, xtts_module())
