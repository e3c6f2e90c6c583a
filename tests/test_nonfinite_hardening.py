"""The NaN/Inf check looks at what is written (after the cast to out_dtype) and works for every float dtype."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import merge_in_process
from streammerge.engine import all_finite
from streammerge.errors import StreamMergeError

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
