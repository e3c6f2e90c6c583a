"""mergekit `slices`: frankenmerges (layer ranges stacked and renumbered) and slices merged with a method, checked
as a transformers model against an in-memory reference, and against mergekit 0.1.5 where it is installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT
from helpers import load_output
from xtts_helpers import run_in_process
from test_methods import ref_slerp
from streammerge.config import load_config
from streammerge.errors import ConfigError, PlanError
from streammerge.engine import describe_plan, prepare

transformers = pytest.importorskip("transformers")
MERGEKIT_YAML = Path(os.environ.get("MERGEKIT_VENV", ROOT / ".venv-mergekit")) / "bin" / "mergekit-yaml"
LAYERS = 4
PROMPT = torch.tensor([[1, 5, 9, 2, 33, 17, 4, 60]])


def llama_config(layers: int = LAYERS):
    return transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                    max_position_embeddings=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three small Llama models (transformers' own layout and config.json): a base and two fine-tunes."""
    root = tmp_path_factory.mktemp("llamas")
    out = {}
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(llama_config())
    for name, seed in (("base", None), ("a", 1), ("b", 2)):
        model = transformers.LlamaForCausalLM(llama_config())
        model.load_state_dict(base.state_dict())
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def state(path: Path) -> dict[str, torch.Tensor]:
    return load_output(Path(path) / "model.safetensors")


def logits(tensors: dict[str, torch.Tensor], layers: int) -> torch.Tensor:
    model = transformers.LlamaForCausalLM(llama_config(layers))
    model.load_state_dict(tensors, strict=True)
    with torch.no_grad():
        return model(PROMPT).logits


def loaded_logits(directory: Path) -> torch.Tensor:
    """The output directory loaded as transformers loads a model (its config.json says how many layers)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return model(PROMPT).logits


def layer(name: str, index: int) -> str:
    return name.replace("model.layers.0.", f"model.layers.{index}.")



def layer_names(tensors: dict) -> list[str]:
    return [n for n in tensors if n.startswith("model.layers.0.")]


def run_mergekit_config(tmp_path: Path, config: dict, cli, name: str = "out") -> Path:
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    result = cli("merge", path, "--output", tmp_path / name, "--quiet", "--max-ram", "300MiB")
    assert result.returncode == 0, result.stderr
    return tmp_path / name


def test_two_slice_frankenmerge_stacks_and_renumbers_layers(tmp_path, models, cli):
    a, b = state(models["a"]), state(models["b"])
    config = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(models["a"]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(models["b"]), "layer_range": [1, 4]}]}]}
    out_dir = run_mergekit_config(tmp_path, config, cli)
    out = load_output(out_dir)
    # reference: a's layers 0-2 then b's layers 1-3, embeddings from the first slice, norm and head from the last
    expected = {"model.embed_tokens.weight": a["model.embed_tokens.weight"], "model.norm.weight": b["model.norm.weight"],
                "lm_head.weight": b["lm_head.weight"]}
    for out_layer, (source, src_layer) in enumerate([(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]):
        for name in layer_names(a):
            expected[layer(name, out_layer)] = source[layer(name, src_layer)]
    assert set(out) == set(expected)
    for name, value in expected.items():
        assert torch.equal(out[name], value), name
    torch.testing.assert_close(loaded_logits(out_dir), logits(expected, 6), rtol=0, atol=0)


def test_same_layer_used_twice_is_read_twice_not_aliased(tmp_path, models):
    config = {"merge_method": "passthrough", "output": str(tmp_path / "out"), "slices": [
        {"sources": [{"model": str(models["a"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(models["a"]), "layer_range": [1, 3]}]}]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    prepared = prepare(load_config(tmp_path / "c.yml"))
    try:
        names = [t.name for t in prepared.plan.tasks]
        assert "model.layers.1.mlp.up_proj.weight" in names and "model.layers.2.mlp.up_proj.weight" in names
        assert not any(t.aliases for t in prepared.plan.tasks)
        assert prepared.plan.config_updates == {"num_hidden_layers": 4}  # for the output's config.json
        shown = describe_plan(prepared)
        assert "slices[1]: 2 layer(s) from models[0] layers 1..2" in shown and "num_hidden_layers = 4" in shown
        assert prepared.config.slices is not None and len(prepared.plan.tasks) == 3 + 4 * len(
            layer_names(state(models["a"])))
    finally:
        prepared.close()


def test_slerp_over_slices_uses_gradients_over_each_slice(tmp_path, models, cli):
    a, b = state(models["a"]), state(models["b"])
    t_attn, t_mlp = [0.0, 0.5, 0.3, 0.7, 1.0], [1.0, 0.5, 0.7, 0.3, 0.0]
    config = {"merge_method": "slerp", "base_model": str(models["a"]), "dtype": "float32", "parameters": {"t": [
        {"filter": "self_attn", "value": t_attn}, {"filter": "mlp", "value": t_mlp}, {"value": 0.5}]},
        "slices": [
            {"sources": [{"model": str(models["a"]), "layer_range": [0, 3]},
                         {"model": str(models["b"]), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(models["b"]), "layer_range": [2, 4]},
                         {"model": str(models["a"]), "layer_range": [1, 3]}], "parameters": {"t": 0.25}}]}
    out_dir = run_mergekit_config(tmp_path, config, cli)
    out = load_output(out_dir)

    def gradient(values, t):  # mergekit: interpolate the list at t in [0, 1]
        scaled = t * (len(values) - 1)
        i = int(scaled)
        j = min(len(values) - 1, i + 1)
        return values[i] * (1 - (scaled - i)) + values[j] * (scaled - i)

    def t_for(name, position):
        return gradient(t_attn, position) if "self_attn" in name else (
            gradient(t_mlp, position) if "mlp" in name else 0.5)

    # embeddings belong to the first slice (t = 0), final norm and head to the last (its own t applies)
    expected = {"model.embed_tokens.weight": ref_slerp(0.5, a["model.embed_tokens.weight"],
                                                       b["model.embed_tokens.weight"]).float()}
    expected.update({n: ref_slerp(0.25, a[n], b[n]).float() for n in ("model.norm.weight", "lm_head.weight")})
    for offset in range(3):  # slice 0: t = offset / 2, a's and b's layers 0-2
        for name in layer_names(a):
            src = layer(name, offset)
            expected[layer(name, offset)] = ref_slerp(t_for(name, offset / 2), a[src], b[src]).float()
    for offset in range(2):  # slice 1: t = 0.25 everywhere, from a's layer 1+offset (base) to b's layer 2+offset
        for name in layer_names(a):
            expected[layer(name, 3 + offset)] = ref_slerp(0.25, a[layer(name, 1 + offset)],
                                                          b[layer(name, 2 + offset)]).float()
    assert set(out) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loaded_logits(out_dir), logits(expected, 5), rtol=1e-4, atol=1e-5)


def test_native_slices_config_with_task_vectors(tmp_path, models):
    """The native form: models by index, per-source weights, the base's layers given per slice."""
    config = {"method": "task_arithmetic", "base": str(models["base"]), "output": str(tmp_path / "out.safetensors"),
              "models": [{"path": str(models["a"])}, {"path": str(models["b"])}],
              "slices": [{"sources": [{"model": 0, "layer_range": [0, 2], "weight": 0.5},
                                      {"model": 1, "layer_range": [2, 4], "weight": 1.0}],
                          "base_layer_range": [1, 3]}]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    prepared = prepare(load_config(tmp_path / "c.yml"))
    from streammerge.engine import Engine
    try:
        Engine(prepared, quiet=True).run()
    finally:
        prepared.close()
    out = load_output(tmp_path / "out.safetensors")
    a, b, base = state(models["a"]), state(models["b"]), state(models["base"])
    for offset in range(2):
        for name in layer_names(a):
            got = out[layer(name, offset)]
            want = base[layer(name, 1 + offset)] + 0.5 * (a[layer(name, offset)] - base[layer(name, 1 + offset)]) + (
                b[layer(name, 2 + offset)] - base[layer(name, 1 + offset)])
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert len([n for n in out if n.startswith("model.layers.")]) == 2 * len(layer_names(a))


@pytest.mark.parametrize("slices, message", [
    ([{"sources": [{"layer_range": [0, 2]}]}], "model"),
    ([{"sources": [{"model": "A", "layer_range": [0, 9]}]}], "no layer 4"),
    ([{"sources": [{"model": "A", "layer_range": [0, 2]}, {"model": "B", "layer_range": [0, 3]}]}], "same number"),
    ([{"sources": [{"model": "A", "layer_range": [2, 1]}]}], "layer_range"),
    ([{"sources": [{"model": "A", "layer_range": [0, 2]}], "residual_weight": 0.5}], "residual_weight"),
])
def test_bad_slices_are_refused_with_a_message(tmp_path, models, capsys, slices, message):
    """The command line's refusal, run in this process (a refused config reads no tensor data)."""
    for piece in slices:
        for src in piece["sources"]:
            if "model" in src:
                src["model"] = str(models["a"] if src["model"] == "A" else models["b"])
    method = "linear" if len(slices[0]["sources"]) > 1 else "passthrough"
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump({"merge_method": method, "slices": slices}))
    result = run_in_process(capsys, "merge", path, "--output", tmp_path / "out", "--quiet")
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_ties_slices_need_the_base_among_the_sources(tmp_path, models):
    config = {"merge_method": "ties", "base_model": str(models["base"]), "slices": [
        {"sources": [{"model": str(models["a"]), "layer_range": [0, 2]},
                     {"model": str(models["b"]), "layer_range": [0, 2]}]}]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="base_model must be one of the slice's sources"):
        load_config(tmp_path / "c.yml")


def test_rule_lists_must_fit_the_slice(tmp_path, models):
    config = {"method": "linear", "output": str(tmp_path / "o.safetensors"),
              "models": [{"path": str(models["a"])}, {"path": str(models["b"])}],
              "rules": [{"match": "*mlp*", "weights": [1, 2, 3]}],
              "slices": [{"sources": [{"model": 0, "layer_range": [0, 2]}, {"model": 1, "layer_range": [0, 2]}]}]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    with pytest.raises(PlanError, match="3 value"):
        prepare(load_config(tmp_path / "c.yml"))


MERGEKIT_SLICE_CONFIGS = {
    # mergekit's examples/orcamini-platy-44layer.yml and gradient-slerp.yml on small models, plus ties over slices
    "frankenmerge": lambda m: {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": m["a"], "layer_range": [0, 3]}]},
        {"sources": [{"model": m["b"], "layer_range": [1, 4]}]}]},
    "gradient_slerp": lambda m: {"merge_method": "slerp", "base_model": m["a"], "dtype": "float32", "parameters": {
        "t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
              {"value": 0.5}]},
        "slices": [{"sources": [{"model": m["a"], "layer_range": [0, 4]}, {"model": m["b"], "layer_range": [0, 4]}]}]},
    "ties_slices": lambda m: {"merge_method": "ties", "base_model": m["base"], "dtype": "float32",
                              "parameters": {"density": [0.3, 0.8], "weight": 0.5}, "slices": [
        {"sources": [{"model": m["base"], "layer_range": [0, 3]}, {"model": m["a"], "layer_range": [0, 3]},
                     {"model": m["b"], "layer_range": [0, 3]}]},
        {"sources": [{"model": m["base"], "layer_range": [2, 4]}, {"model": m["a"], "layer_range": [2, 4]},
                     {"model": m["b"], "layer_range": [1, 3]}], "parameters": {"weight": [0.2, 0.9]}}]},
}


# mergekit-yaml's own command, run on each config in one process: its start-up (torch, transformers) costs more
# than these small merges. A case that fails leaves its traceback in OUT.error.
MERGEKIT_EACH = """import pathlib, sys, traceback
from mergekit.scripts.run_yaml import main
for config, out in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        main([config, out, "--allow-crimes"], standalone_mode=False)
    except BaseException:
        pathlib.Path(out + ".error").write_text(traceback.format_exc())
"""


@pytest.fixture(scope="module")
def mergekit_outputs(tmp_path_factory, models):
    """{case: (config file, mergekit's output directory, its traceback file)} for MERGEKIT_SLICE_CONFIGS."""
    root = tmp_path_factory.mktemp("mergekit")
    cases, args = {}, []
    for case, make in MERGEKIT_SLICE_CONFIGS.items():
        config = root / f"{case}.yml"
        config.write_text(yaml.safe_dump(make({k: str(v) for k, v in models.items()})))
        cases[case] = (config, root / case, root / f"{case}.error")
        args += [str(config), str(root / case)]
    result = subprocess.run([str(MERGEKIT_YAML.parent / "python"), "-c", MERGEKIT_EACH, *args],
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return cases


@pytest.mark.skipif(not MERGEKIT_YAML.exists(), reason="mergekit 0.1.5 not installed (make mergekit)")
@pytest.mark.parametrize("case", sorted(MERGEKIT_SLICE_CONFIGS))
def test_slices_match_mergekit(tmp_path, models, cli, case, mergekit_outputs):
    config, mergekit_dir, mergekit_error = mergekit_outputs[case]
    ours = load_output(run_mergekit_config(tmp_path, yaml.safe_load(config.read_text()), cli, "ours"))
    assert not mergekit_error.exists(), mergekit_error.read_text()[-3000:]
    theirs = {}
    for f in sorted(mergekit_dir.glob("*.safetensors")):
        theirs.update(load_output(f))
    assert set(ours) == set(theirs)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    assert json.loads((mergekit_dir / "config.json").read_text())["num_hidden_layers"] == len(
        {n.split(".")[2] for n in ours if n.startswith("model.layers.")})


@pytest.mark.big
def test_frankenmerge_of_a_1gb_model_within_256_mib(tmp_path, cli):
    """mergekit's 44-layer frankenmerge shape on a ~1.07 GB Llama-shaped model: peak anonymous RSS (sampled
    from outside and by the run's own guard) stays within max_ram = 256 MiB."""

    from safetensors import safe_open
    from safetensors.torch import save_file

    from compare_mergekit import llama_tensors
    from test_memory_bound import MIB, run_sampling_peak

    tensors = llama_tensors(32000, 2048, 5504, 4, torch.Generator().manual_seed(0))
    (tmp_path / "big").mkdir()
    save_file(tensors, tmp_path / "big" / "model.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "big" / "model.safetensors").stat().st_size > 1.0e9
    del tensors
    config = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(tmp_path / "big"), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(tmp_path / "big"), "layer_range": [1, 4]}]}]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    returncode, stderr, peak = run_sampling_peak(
        [sys.executable, "-m", "streammerge", "merge", str(tmp_path / "c.yml"), "--output", str(tmp_path / "out"),
         "--quiet", "--max-ram", "256MiB", "--report", str(tmp_path / "report.json")], timeout=900)
    assert returncode == 0, stderr
    report = json.loads((tmp_path / "report.json").read_text())
    print(f"frankenmerge of 1.07 GB: {report['seconds']:.1f} s, peak anonymous RSS {peak / MIB:.0f} MiB sampled, "
          f"{report['peak_anon_bytes'] / MIB:.0f} MiB by the guard; wrote {report['written_bytes'] / 1e9:.2f} GB")
    assert peak <= 256 * MIB and report["peak_anon_bytes"] <= 256 * MIB
    with safe_open(tmp_path / "big" / "model.safetensors", "pt") as src:
        files = sorted((tmp_path / "out").glob("*.safetensors"))
        out = {}
        for f in files:
            with safe_open(f, "pt") as handle:
                out.update({k: f for k in handle.keys()})
        assert len({n.split(".")[2] for n in out if n.startswith("model.layers.")}) == 6
        for out_name, src_name in [("model.layers.4.mlp.up_proj.weight", "model.layers.2.mlp.up_proj.weight"),
                                   ("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"),
                                   ("model.embed_tokens.weight", "model.embed_tokens.weight")]:
            with safe_open(out[out_name], "pt") as handle:
                assert torch.equal(handle.get_tensor(out_name), src.get_tensor(src_name)), out_name
