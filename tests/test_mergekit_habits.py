"""mergekit command-line habits: `merge CFG OUT`, mergekit-moe configs explained, ignored parameters warned."""

from __future__ import annotations

import yaml
from safetensors.torch import load_file

from helpers import random_state_dict, save
from safety_support import run_main  # the command line's code path, in this process


def _config(tmp_path, **extra):
    a = save(random_state_dict(0), tmp_path / "a.safetensors")
    b = save(random_state_dict(1), tmp_path / "b.safetensors")
    path = tmp_path / "mk.yml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}], **extra}))
    return path


def test_positional_output_like_mergekit_yaml(tmp_path, cli):
    result = cli("merge", _config(tmp_path), tmp_path / "out.safetensors", "--quiet")
    assert result.returncode == 0, result.stderr
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    assert set(out) == set(a)
    assert all(((a[k] + b[k]) / 2).allclose(out[k]) for k in a if a[k].is_floating_point())


def test_two_different_outputs_are_refused(tmp_path):
    result = run_main("merge", _config(tmp_path), tmp_path / "x.safetensors", "--output", tmp_path / "y.safetensors")
    assert result.returncode == 1 and "two outputs" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_ignored_parameter_is_a_warning_naming_it(tmp_path):
    result = run_main("merge", _config(tmp_path, parameters={"density": 0.5}), tmp_path / "out.safetensors")
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "'density' is ignored" in result.stderr
    assert "mergekit ignores it too" in result.stderr


def test_mergekit_moe_config_is_explained(tmp_path):
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump({"base_model": "x", "gate_mode": "hidden", "dtype": "bfloat16", "experts": [
        {"source_model": "a", "positive_prompts": ["code"]}, {"source_model": "b", "positive_prompts": ["math"]}]}))
    result = run_main("merge", path, tmp_path / "out")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "mergekit-moe config" in result.stderr and "mixture-of-experts" in result.stderr
    assert "merge_method" in result.stderr  # says what is supported
    assert "unknown key" not in result.stderr
