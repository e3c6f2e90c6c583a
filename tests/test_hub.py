"""Hub ids in mergekit and streammerge configs resolve through huggingface_hub's local cache, offline."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

from hf_models import build_llama, put_in_hub_cache, read_state


def _env(hf_home):
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


def test_hub_ids_and_revisions_come_from_the_local_cache(tmp_path, cli):
    base = build_llama(tmp_path / "src-base", seed=0)
    v1 = build_llama(tmp_path / "src-v1", seed=1, like=base)
    v2 = build_llama(tmp_path / "src-v2", seed=2, like=base)
    hf_home = tmp_path / "hf"
    put_in_hub_cache(base, hf_home, "acme/base")
    put_in_hub_cache(v1, hf_home, "acme/tune", revision="main")
    put_in_hub_cache(v2, hf_home, "acme/tune", revision="v2")
    config = tmp_path / "mk.yml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": "acme/base", "parameters": {"weight": 0.5}},
        {"model": "acme/tune@v2", "parameters": {"weight": 0.25}},
        {"model": {"model": {"path": "acme/tune", "revision": "main"}}, "parameters": {"weight": 0.25}}]}))
    result = cli("merge", config, tmp_path / "out", "--quiet", env=_env(hf_home), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out, a, b, c = (read_state(p) for p in (tmp_path / "out", base, v2, v1))
    for name in a:
        torch.testing.assert_close(out[name], 0.5 * a[name] + 0.25 * b[name] + 0.25 * c[name])


def test_offline_and_not_cached_names_the_id(tmp_path, cli):
    base = build_llama(tmp_path / "src-base", seed=0)
    put_in_hub_cache(base, tmp_path / "hf", "acme/base")
    config = tmp_path / "mk.yml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": "acme/base"}, {"model": "acme/missing@v3"}]}))
    result = cli("merge", config, tmp_path / "out", env=_env(tmp_path / "hf"), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "'acme/missing' at revision 'v3'" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    assert not (tmp_path / "out").exists()


def test_hub_ids_in_a_streammerge_config(tmp_path, cli):
    """`models[].path` and `base` of a native config take Hub ids too (with @revision and as MODEL+ADAPTER); a
    missing local path next to an existing directory stays a missing file."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = build_llama(tmp_path / "src-base", seed=0)
    v1 = build_llama(tmp_path / "src-v1", seed=1, like=base)
    v2 = build_llama(tmp_path / "src-v2", seed=2, like=base)
    torch.manual_seed(3)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(v1, dtype=torch.float32),
                                peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["v_proj"]))
    model.save_pretrained(tmp_path / "src-adapter")
    tuned = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    hf_home = tmp_path / "hf"
    put_in_hub_cache(base, hf_home, "acme/base")
    put_in_hub_cache(v1, hf_home, "acme/tune", revision="main")
    put_in_hub_cache(v2, hf_home, "acme/tune", revision="v2")
    put_in_hub_cache(tmp_path / "src-adapter", hf_home, "acme/adapter")
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": "acme/base", "models": [
        {"path": "acme/tune@v2", "weight": 0.5}, {"path": "acme/tune+acme/adapter", "weight": 0.25}]}))
    result = cli("merge", config, tmp_path / "out", "--quiet", env=_env(hf_home), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out, b, t2 = (read_state(p) for p in (tmp_path / "out", base, v2))
    for name in b:
        torch.testing.assert_close(out[name], b[name] + 0.5 * (t2[name] - b[name]) + 0.25 * (tuned[name] - b[name]),
                                   msg=name)

    config.write_text(yaml.safe_dump({"models": [{"path": "acme/base"}, {"path": "acme/missing@v3"}]}))
    result = cli("merge", config, tmp_path / "out2", env=_env(hf_home), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "'acme/missing' at revision 'v3'" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    (tmp_path / "ckpts").mkdir()
    config.write_text(yaml.safe_dump({"models": [{"path": "acme/base"}, {"path": "ckpts/a"}]}))
    result = cli("merge", config, tmp_path / "out2", env=_env(hf_home), cwd=tmp_path)
    assert result.returncode == 1 and "ckpts/a: no such file or directory" in result.stderr, result.stderr
    assert not (tmp_path / "out2").exists()
