"""The NaN/Inf check looks at what is written (after the cast to out_dtype) and works for every float dtype."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import merge_in_process
from streammerge.engine import all_finite
from streammerge.errors import StreamMergeError
from streammerge.methods.registry import get_method, methods

F8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]


@pytest.mark.parametrize("dtype", F8)
def test_float8_take_and_convert_are_bit_exact(tmp_path, cli, dtype):
    values = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.5, -0.25]).to(dtype)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"f8": values, "w": torch.ones(3)}, a)
    save_file({"f8": values, "w": torch.zeros(3)}, b)
    merge_in_process({"output": str(tmp_path / "m.safetensors"), "models": [str(a), str(b)],
                      "rules": [{"match": "f8", "take": 0}]})
    got = load_file(tmp_path / "m.safetensors")["f8"]
    assert got.dtype == dtype and torch.equal(got.view(torch.uint8), values.view(torch.uint8))
    result = cli("convert", a, "--output", tmp_path / "c.safetensors", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert torch.equal(load_file(tmp_path / "c.safetensors")["f8"].view(torch.uint8), values.view(torch.uint8))


@pytest.mark.parametrize("dtype", F8)
def test_float8_nonfinite_is_found(dtype):
    assert all_finite(torch.tensor([1.0, -448.0 if dtype == torch.float8_e4m3fn else -57344.0]).to(dtype))
    assert not all_finite(torch.tensor([1.0, float("nan")]).to(dtype))
    if dtype == torch.float8_e5m2:
        assert not all_finite(torch.tensor([float("-inf"), 1.0]).to(dtype))


@pytest.mark.parametrize("out_dtype, value", [("float16", 7e4), ("float16", -1e5), ("bfloat16", 3e38 * 10)])
def test_overflow_in_the_cast_to_out_dtype_is_caught(tmp_path, out_dtype, value):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.full((4,), value, dtype=torch.float64)}, a)
    save_file({"w": torch.full((4,), value, dtype=torch.float64)}, b)
    config = {"output": str(tmp_path / "m.safetensors"), "models": [str(a), str(b)], "out_dtype": out_dtype,
              "dtype": "float64"}
    with pytest.raises(StreamMergeError, match="do not fit the output dtype"):
        merge_in_process(config)
    assert not (tmp_path / "m.safetensors").exists()
    report = merge_in_process({**config, "nan_policy": "allow"})
    assert report.nonfinite_tensors == ["w"]
    assert torch.isinf(load_file(tmp_path / "m.safetensors")["w"]).all()


def test_values_that_fit_pass(tmp_path):
    a = tmp_path / "a.safetensors"
    save_file({"w": torch.full((4,), 6e4)}, a)
    merge_in_process({"output": str(tmp_path / "m.safetensors"), "models": [str(a), str(a)], "out_dtype": "float16"})
    assert torch.equal(load_file(tmp_path / "m.safetensors")["w"], torch.full((4,), 6e4).half())


@pytest.mark.parametrize("name", [m.name for m in methods()])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_every_method_meets_an_input_holding_inf_or_nan_with_the_usual_message(tmp_path, name, bad):
    """Statistics passes included: Inf or NaN in an input ends in the message naming the tensor and the file
    (or, with allow_nonfinite, in a written output), never in an error from inside the method."""
    method = get_method(name)
    n_models = max(method.min_models, min(2, method.max_models or 2))
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n_models + (1 if method.uses_base else 0)):
        w = torch.randn(96, 64, generator=g)
        if i == 1:
            w[5, 7] = bad
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file({"w": w}, paths[-1])
    typical = method.typical
    config = {"method": name, "output": str(tmp_path / "out.safetensors"), "parameters": typical.get("parameters", {}),
              "models": [{"path": str(p), **typical.get("model", {})} for p in paths[-n_models:]]}
    if method.uses_base:
        config["base"] = str(paths[0])
    try:
        merge_in_process(config)
    except StreamMergeError as e:
        assert "'w' has NaN or Inf" in str(e) and "m1.safetensors" in str(e), e
    else:  # a method may drop the entry (an unselected slice, a zero weight): then the output is finite
        assert torch.isfinite(load_file(tmp_path / "out.safetensors")["w"]).all()
    merge_in_process(config, allow_nonfinite=True)
    assert load_file(tmp_path / "out.safetensors")["w"].shape == (96, 64)
