"""`streammerge diff`: distances and cosines against values computed here on whole tensors."""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import save_file
from safety_support import run_main  # the command line's code path, in this process


def _pair(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = {"model.layers.0.w": torch.randn(300, 200, generator=g), "model.layers.1.w": torch.randn(50, generator=g),
         "model.embed.weight": torch.randn(40, 8, generator=g), "steps": torch.tensor([3])}
    b = {k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in a.items()}
    b["extra"] = torch.ones(2)
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    return a, b


def test_diff_figures_match_whole_tensor_reference(tmp_path, cli):
    a, b = _pair(tmp_path)
    result = cli("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--json")
    assert result.returncode == 0, result.stderr
    (report,) = json.loads(result.stdout).values()
    for name in ("model.layers.0.w", "model.layers.1.w", "model.embed.weight"):
        x, y = a[name].double().flatten(), b[name].double().flatten()
        figures = report["tensors"][name]
        assert math.isclose(figures["relative_l2"], ((x - y).norm() / y.norm()).item(), rel_tol=1e-9)
        assert math.isclose(figures["cosine"], (x @ y / (x.norm() * y.norm())).item(), rel_tol=1e-9)
    assert set(report["groups"]) == {"model.layers.0", "model.layers.1", "model.embed"}
    assert report["only_second"] == ["extra"]


def test_diff_against_a_base_prints_a_table(tmp_path):
    _pair(tmp_path)
    result = run_main("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--base", tmp_path / "a.safetensors")
    assert result.returncode == 0, result.stderr
    assert "vs base" in result.stdout and "model.layers.0" in result.stdout
    assert " 0.000e+00 " in result.stdout  # a against itself


def test_diff_needs_two_inputs_without_base(tmp_path):
    _pair(tmp_path)
    result = run_main("diff", tmp_path / "a.safetensors")
    assert result.returncode == 1 and "--base" in result.stderr


def test_diff_plot_or_a_clear_message(tmp_path):
    _pair(tmp_path)
    result = run_main("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--plot", tmp_path / "p.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert result.returncode == 1 and "streammerge[plot]" in result.stderr
    else:
        assert result.returncode == 0 and (tmp_path / "p.png").stat().st_size > 0
