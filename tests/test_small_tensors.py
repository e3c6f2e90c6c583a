"""Many small tensors: runs of tensors lying back to back in every input are merged as one chunk, with results
bit-identical to merging them one at a time; the per-tensor records stay small enough for a small budget."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import streammerge.engine as engine_module
from helpers import load_output, merge_in_process, reference_linear, save
from streammerge.errors import StreamMergeError
from streammerge.methods.registry import get_method, methods

SIZES = (1, 3, 7, 13, 64, 100, 257, 5)  # odd sizes: vectorised bodies and scalar tails both occur


def small_models(count: int = 3, tensors: int = 400, nan_at: str | None = None) -> list[dict]:
    models = []
    for seed in range(count):
        g = torch.Generator().manual_seed(seed)
        sd = {f"blocks.{i:04d}.w": torch.randn(SIZES[i % len(SIZES)], generator=g) for i in range(tensors)}
        sd.update({f"half.{i:03d}": torch.randn(SIZES[i % len(SIZES)], generator=g).half() for i in range(40)})
        sd["big"] = torch.randn(300, 300, generator=g)  # above the small-tensor size: merged on its own
        sd["steps"] = torch.tensor([5, 6])  # copied, checked equal
        if nan_at is not None and seed == 1:
            sd[nan_at][0] = float("nan")
        models.append(sd)
    return models


def merge(tmp, models, out_name="out.safetensors", out_dtype=None, **engine_options):
    tmp.mkdir(parents=True, exist_ok=True)
    paths = [save(sd, tmp / f"model{i}.safetensors") for i, sd in enumerate(models)]
    config = {"method": "linear", "output": str(tmp / out_name),
              "models": [{"path": str(p), "weight": w} for p, w in zip(paths, (0.5, 0.3, 0.2))]}
    if out_dtype:
        config["out_dtype"] = out_dtype
    report = merge_in_process(config, **engine_options)
    return report, load_output(tmp / out_name)


@pytest.mark.parametrize("out_dtype", [None, "bfloat16"])
def test_runs_of_small_tensors_match_one_at_a_time(tmp_path, monkeypatch, out_dtype):
    models = small_models()
    calls = []  # elements of each merged chunk
    monkeypatch.setattr(engine_module.Engine, "_context", _counting_context(calls))
    _, batched = merge(tmp_path / "runs", models, out_dtype=out_dtype)
    merges_in_runs = len(calls)
    calls.clear()
    monkeypatch.setattr(engine_module, "SMALL_TENSOR", 0)  # every tensor on its own
    _, single = merge(tmp_path / "single", models, out_dtype=out_dtype)
    assert len(calls) == len(single) - 1  # one merge per float tensor ("steps" is copied)
    # A handful of runs (float32 tensors, float16 tensors, the large one) instead of one merge per tensor.
    assert merges_in_runs <= 5, merges_in_runs
    assert batched.keys() == single.keys()
    for name in single:
        assert batched[name].dtype == single[name].dtype
        assert torch.equal(batched[name].view(torch.uint8), single[name].view(torch.uint8)), name
    reference = reference_linear(models, [0.5, 0.3, 0.2])
    for name, value in reference.items():
        expected = value.to(torch.bfloat16) if out_dtype and value.is_floating_point() else value
        torch.testing.assert_close(batched[name], expected)  # within the tolerances of its dtype


ELEMENTWISE = [m.name for m in methods() if m.elementwise]
SEGMENTED = [m.name for m in methods() if m.segmented]


def _runs_and_single(tmp_path, monkeypatch, name, models, model_params=None, extra=None, **engine_options):
    """The outputs of a merge with runs of small tensors and of the same merge one tensor at a time, and the
    number of chunks the first merged."""
    method = get_method(name)
    n_models = max(method.min_models, min(2, method.max_models or 2))
    typical = method.typical
    model_params = model_params or [typical.get("model", {})] * n_models

    def merge_all(tmp: Path) -> dict:
        tmp.mkdir()
        paths = [save(sd, tmp / f"model{i}.safetensors") for i, sd in enumerate(models)]
        config = {"method": name, "output": str(tmp / "out.safetensors"), "parameters": typical.get("parameters", {}),
                  "models": [{"path": str(p), **params} for p, params in zip(paths[-n_models:], model_params)],
                  **(extra or {})}
        if method.uses_base:
            config["base"] = str(paths[0])
        merge_in_process(config, **engine_options)
        return load_output(tmp / "out.safetensors")

    with monkeypatch.context() as patch:
        calls = []
        patch.setattr(engine_module.Engine, "_context", _counting_context(calls))
        batched = merge_all(tmp_path / "runs")
        chunks = len(calls)
        patch.setattr(engine_module, "SMALL_TENSOR", 0)
        single = merge_all(tmp_path / "single")
    return batched, single, chunks


def _assert_same_bits(batched: dict, single: dict) -> None:
    assert batched.keys() == single.keys()
    for key in single:
        assert torch.equal(batched[key].view(torch.uint8), single[key].view(torch.uint8)), key


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_every_elementwise_method_gives_the_same_bits_in_runs(tmp_path, monkeypatch, name):
    """A method declared element-wise has its small tensors merged in runs: that must change no bit (a method
    whose entries depended on their position, such as a random sparsifier, would fail here)."""
    method = get_method(name)
    n_models = max(method.min_models, min(2, method.max_models or 2))
    models = small_models(n_models + (1 if method.uses_base else 0), tensors=60)
    batched, single, chunks = _runs_and_single(tmp_path, monkeypatch, name, models)
    assert chunks <= 5, chunks  # the runs were taken
    _assert_same_bits(batched, single)


def quantized(models: list[dict]) -> list[dict]:
    """The models with values on a coarse grid: many task-vector entries of equal magnitude, so thresholds fall
    among ties and the tie gates decide by position."""
    return [{k: (v * 2).round() / 2 if v.is_floating_point() else v for k, v in sd.items()} for sd in models]


SEGMENTED_CASES = {
    "typical": {},
    "keep all or drop all": {"model_params": [{"density": 1.0}, {"density": 0.0}]},
    "some keep all": {"model_params": [{"density": 0.4}, {"density": 1.0}]},
    "equal values": {"quantize": True},
    "ties at the thresholds": {"quantize": True, "model_params": [{"density": 0.3}, {"density": 0.6}]},
    "rescale": {"extra": {"parameters": {"rescale": True}}, "model_params": [{"density": 0.3}, {"density": 0.7}]},
    "float64": {"extra": {"dtype": "float64"}},
    "nan inside a run": {"nan": True},
}


def _applies(name: str, case: str) -> bool:
    """Whether the method has the parameters the case sets."""
    method, spec = get_method(name), SEGMENTED_CASES[case]
    wanted = {key for m in spec.get("model_params", []) for key in m}
    wanted |= set(spec.get("extra", {}).get("parameters", {}))
    return all(method.param(key) for key in wanted)


@pytest.mark.parametrize("name, case", [(name, case) for name in SEGMENTED for case in SEGMENTED_CASES
                                        if _applies(name, case)])
def test_every_segmented_method_gives_the_same_bits_in_runs(tmp_path, monkeypatch, name, case):
    """A segmented method merges runs of small tensors as one chunk, with each tensor's statistics, selection or
    random draws made on its segment: every bit as when each tensor is merged alone, whatever selects (keep all,
    drop all, thresholds among ties decided by position, a rescale), in float64 and with a NaN inside a run."""
    spec = SEGMENTED_CASES[case]
    method = get_method(name)
    models = small_models(3, tensors=60, nan_at="blocks.0031.w" if spec.get("nan") else None)  # (in a model)
    if spec.get("nan"):
        for sd in models:  # and in every model: NaN wherever the method reads the element
            sd["blocks.0033.w"][1] = float("nan")
    if spec.get("quantize"):
        models = quantized(models)
    model_params = spec.get("model_params")
    if model_params and method.param("gamma"):
        model_params = [{**m, "gamma": 0.1} for m in model_params]
    extra = dict(spec.get("extra", {}))
    batched, single, chunks = _runs_and_single(tmp_path, monkeypatch, name, models, model_params, extra,
                                               allow_nonfinite=bool(spec.get("nan")))
    assert chunks <= 5, chunks  # the runs were taken
    _assert_same_bits(batched, single)
    if spec.get("nan"):
        assert torch.isnan(batched["blocks.0033.w"][1])


def test_a_segmented_run_selects_every_tensor_at_once(tmp_path, monkeypatch):
    """ties' thresholds for a run come from one |delta| per model over the run (`Method.segment_stats`), not from
    each tensor's own statistics passes; with a rescale (norms of the pruned deltas) each tensor makes its own."""
    passes = []
    original = engine_module.Engine._statistics_in_memory

    def counting(self, ctx, n):
        passes.append(ctx.name)
        return original(self, ctx, n)

    monkeypatch.setattr(engine_module.Engine, "_statistics_in_memory", counting)
    models = small_models(3, tensors=60)
    merge_in_process({"method": "ties", "base": str(save(models[0], tmp_path / "b.safetensors")),
                      "output": str(tmp_path / "o.safetensors"),
                      "models": [{"path": str(save(sd, tmp_path / f"m{i}.safetensors")), "density": 0.5}
                                 for i, sd in enumerate(models[1:])]})
    assert passes == ["big"], passes  # the one tensor above the small-tensor size
    passes.clear()
    merge_in_process({"method": "ties", "base": str(tmp_path / "b.safetensors"), "parameters": {"rescale": True},
                      "output": str(tmp_path / "r.safetensors"),
                      "models": [{"path": str(tmp_path / f"m{i}.safetensors"), "density": 0.5} for i in range(2)]})
    assert len(passes) == len(models[0]) - 1  # every float tensor ("steps" is copied)


def _counting_context(calls):
    original = engine_module.Engine._context

    def context(self, task, ws, start, stop):
        calls.append(stop - start)
        return original(self, task, ws, start, stop)

    return context


def test_nonfinite_tensor_inside_a_run_is_named(tmp_path):
    models = small_models(nan_at="blocks.0123.w")
    with pytest.raises(StreamMergeError, match="'blocks.0123.w' has NaN"):
        merge(tmp_path / "refused", models)
    assert not (tmp_path / "refused" / "out.safetensors").exists()
    report, out = merge(tmp_path / "allowed", models, allow_nonfinite=True)
    assert report.nonfinite_tensors == ["blocks.0123.w"]
    assert torch.isnan(out["blocks.0123.w"][0]) and torch.isfinite(out["blocks.0124.w"]).all()


def test_runs_into_a_sharded_directory_and_a_pth(tmp_path):
    """Outputs without a one-write path for runs get each tensor of a run written on its own."""
    models = small_models(tensors=200)
    _, single_file = merge(tmp_path / "file", models)
    for name in ("sharded", "out.pth"):
        paths = [save(sd, tmp_path / f"m{i}.safetensors") for i, sd in enumerate(models)]
        config = {"method": "linear", "output": str(tmp_path / name), "shard_size": 20_000,
                  "models": [{"path": str(p), "weight": w} for p, w in zip(paths, (0.5, 0.3, 0.2))]}
        merge_in_process(config)
        out = (load_output(tmp_path / name) if name == "sharded"
               else torch.load(tmp_path / name, weights_only=True))
        assert out.keys() == single_file.keys()
        for key in out:
            assert torch.equal(out[key], single_file[key]), (name, key)


MANY_SMALL_UNDER_A_SMALL_BUDGET = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from safetensors.torch import save_file
    import torch
    from streammerge.config import parse_config
    from streammerge.engine import merge
    from streammerge.memory import anon_rss, OVERHEAD, MIN_CHUNK_ELEMENTS, bytes_per_element

    tmp, tensors = Path(sys.argv[1]), int(sys.argv[2])
    paths = []
    for i in range(3):
        data = torch.randn(tensors, 64, generator=torch.Generator().manual_seed(i))
        paths.append(tmp / f"model{i}.safetensors")
        save_file({f"blocks.{j // 10}.layer{j % 10}.weight": data[j].clone() for j in range(tensors)}, paths[-1])
        del data
    baseline = anon_rss()
    # What the process holds before reading anything, the margin and smallest chunks every budget keeps, and
    # 1.5 KiB per output tensor for the records of its three inputs, its task and its output placement.
    budget = baseline + OVERHEAD + MIN_CHUNK_ELEMENTS * bytes_per_element(3, 4, 4) + tensors * 1536
    config = parse_config({"method": "linear", "output": str(tmp / "out.safetensors"),
                           "models": [{"path": str(p)} for p in paths]})
    report = merge(config, max_ram=budget, quiet=True)
    print(json.dumps({"budget": budget, "peak": report.peak_anon_bytes, "baseline": baseline}))
""")


def test_many_small_tensors_fit_a_small_budget(tmp_path):
    """Per-tensor records (three inputs' descriptions, the plan's task, the output's placement) take about
    1.2 KiB per output tensor; they took 3.8 KiB, so 20,000 tensors were refused at this budget."""
    tensors = 20_000
    run = subprocess.run([sys.executable, "-c", MANY_SMALL_UNDER_A_SMALL_BUDGET, str(tmp_path), str(tensors)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["peak"] <= figures["budget"]
    merged = load_output(tmp_path / "out.safetensors")
    assert len(merged) == tensors


def test_a_segmented_run_holds_a_bounded_number_of_tensors(tmp_path, monkeypatch):
    """A segmented run keeps records per tensor (segments, statistics, contexts), so the number of its tensors is
    bounded (`SEGMENTS_PER_RUN`), with the same bits."""
    monkeypatch.setattr(engine_module, "SEGMENTS_PER_RUN", 7)
    batched, single, chunks = _runs_and_single(tmp_path, monkeypatch, "ties", small_models(3, tensors=60))
    _assert_same_bits(batched, single)
    runs = math.ceil(60 / 7) + math.ceil(40 / 7)  # the float32 and the float16 tensors
    assert runs <= chunks <= runs + 1, chunks  # and the large tensor
