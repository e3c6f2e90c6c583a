"""Directory outputs of Hugging Face models load with transformers and give the logits of an in-memory merge:
config.json, generation config, tokenizer and model card beside the weights; tied embeddings; union tokenizers.
mergekit 0.1.5 cross-checks the tied and union cases where it is installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT
from hf_models import build_llama, llama_config, logits, read_state, rows_by_token
from safety_support import run_main

W = (0.6, 0.4)


def merge(tmp_path, config: dict, name="out") -> Path:
    """Merge through `main` in-process (what is checked is the output; the tests below that call `cli`
    themselves run the real command)."""
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    result = run_main("merge", path, tmp_path / name, "--quiet")
    assert result.returncode == 0, result.stderr
    return tmp_path / name


def linear_config(models, **extra) -> dict:
    return {"merge_method": "linear", "dtype": "float32", **extra,
            "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, W)]}


def weighted(states, names=None) -> dict:
    names = names or states[0].keys()
    return {n: sum(w * s[n].float() for w, s in zip(W, states)) / sum(W) for n in names}


def assert_same_logits(out: Path, reference: dict, config, tokenizer_dir: Path):
    got = logits(out)
    want = logits(reference, config, tokenizer_path=tokenizer_dir)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def mergekit_yaml() -> str | None:
    candidate = os.environ.get("MERGEKIT_YAML") or str(ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml")
    return candidate if Path(candidate).is_file() else None


def run_mergekit(tmp_path, config: dict, name: str) -> Path:
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    result = subprocess.run([mergekit_yaml(), str(path), str(tmp_path / name)], capture_output=True, text=True,
                            env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / name


needs_mergekit = pytest.mark.skipif(mergekit_yaml() is None, reason="mergekit 0.1.5 not installed (make mergekit, "
                                    "or MERGEKIT_YAML=path/to/mergekit-yaml)")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base and fine-tunes in the layouts people have: sharded bf16 safetensors, fp16 .bin, added tokens."""
    root = tmp_path_factory.mktemp("family")
    base = build_llama(root / "base", seed=0)
    return {
        "base": base,
        "sharded_bf16": build_llama(root / "sharded", seed=1, like=base, dtype=torch.bfloat16, shard_size="60KB"),
        "bin_fp16": build_llama(root / "bin", seed=2, like=base, dtype=torch.float16, fmt="bin"),
        "added": build_llama(root / "added", seed=3, like=base, added_tokens=[f"<extra{i}>" for i in range(8)]),
        "tied": build_llama(root / "tied", seed=4, tie=True),
        "tied_ft": build_llama(root / "tied_ft", seed=5, tie=True, like=root / "tied"),
        "tied_bin": build_llama(root / "tied_bin", seed=6, tie=True, like=root / "tied", fmt="bin"),
    }


def test_linear_merge_of_mixed_layouts_is_a_loadable_model(tmp_path, cli, family):
    models = [family["sharded_bf16"], family["bin_fp16"]]
    out = merge(tmp_path, linear_config(models, out_dtype="float32"))
    files = sorted(p.name for p in out.iterdir())
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md"} <= set(files), files
    config = json.loads((out / "config.json").read_text())
    donor = json.loads((models[0] / "config.json").read_text())
    assert config["dtype"] == "float32" and donor["dtype"] == "bfloat16"  # the changed field, under the donor's key
    assert {k: v for k, v in config.items() if k != "dtype"} == {k: v for k, v in donor.items() if k != "dtype"}
    assert (out / "generation_config.json").read_bytes() == (models[0] / "generation_config.json").read_bytes()
    card = (out / "README.md").read_text()
    assert "linear" in card and str(models[1]) in card and "out_dtype: float32" in card  # the config as run
    reference = weighted([read_state(m) for m in models])
    assert_same_logits(out, reference, llama_config(1000), models[0])


def test_mergekit_ties_config_from_the_command_line_loads_with_the_reference_logits(tmp_path, cli, family):
    """`streammerge merge CFG OUT` on a mergekit TIES config over a bf16 sharded and an fp16 .bin fine-tune: the
    output loads with AutoModelForCausalLM / AutoTokenizer and gives the logits of an in-memory TIES merge."""
    from test_methods import ref_keep, ref_task_vectors

    base, tunes = family["base"], [family["sharded_bf16"], family["bin_fp16"]]
    config = {"merge_method": "ties", "base_model": str(base), "dtype": "float32", "out_dtype": "float32",
              "parameters": {"normalize": True}, "models": [
                  {"model": str(tunes[0]), "parameters": {"weight": 0.6, "density": 0.5}},
                  {"model": str(tunes[1]), "parameters": {"weight": 0.4, "density": 0.7}}]}
    out = merge(tmp_path, config)
    b, xs = read_state(base), [read_state(t) for t in tunes]
    reference = {}
    for name in b:
        x = [s[name].float() for s in xs]
        keeps = [ref_keep(v - b[name], "magnitude", d) for v, d in zip(x, (0.5, 0.7))]
        reference[name] = ref_task_vectors(b[name], x, [0.6, 0.4], keeps, consensus=True, normalize=True)
    state = read_state(out)
    for name, value in reference.items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert_same_logits(out, reference, llama_config(1000), base)


def test_tied_models_stay_tied(tmp_path, cli, family):
    models = [family["tied"], family["tied_ft"]]
    out = merge(tmp_path, linear_config(models))
    state = read_state(out)
    assert "lm_head.weight" not in {n for f in out.glob("*.safetensors") for n in _names(f)}
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    reference = weighted([read_state(m) for m in models])
    assert torch.allclose(state["model.embed_tokens.weight"], reference["model.embed_tokens.weight"], atol=1e-6)
    assert_same_logits(out, reference, llama_config(1000, tie=True), models[0])


def test_bin_with_tied_lm_head_merges_with_safetensors_without_it(tmp_path, cli, family):
    """transformers' .bin files hold a tied lm_head.weight (shared storage); its safetensors files do not."""
    models = [family["tied"], family["tied_bin"]]
    out = merge(tmp_path, linear_config(models))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    state = read_state(out)
    reference = weighted([read_state(m) for m in models])
    torch.testing.assert_close(state["lm_head.weight"], state["model.embed_tokens.weight"])
    assert_same_logits(out, reference, llama_config(1000, tie=True), models[0])


def test_tied_model_contributes_its_embedding_as_lm_head(tmp_path, cli, family):
    models = [family["tied"], family["base"]]  # tied + untied
    out = merge(tmp_path, linear_config(models))
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # the donor was tied; the output is not
    tied, untied = read_state(models[0]), read_state(models[1])
    state = read_state(out)
    torch.testing.assert_close(state["lm_head.weight"], (0.6 * tied["model.embed_tokens.weight"]
                                                        + 0.4 * untied["lm_head.weight"]) / 1.0)
    assert_same_logits(out, weighted([tied, untied]), llama_config(1000, tie=False), models[0])


def test_union_tokenizer_places_rows_by_token(tmp_path, cli, family):
    base, added = family["base"], family["added"]
    config = linear_config([base, added], base_model=str(base), tokenizer_source="union", chat_template="chatml")
    out = merge(tmp_path, config)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 1008 and json.loads((out / "config.json").read_text())["vocab_size"] == 1008
    assert tokenizer.apply_chat_template([{"role": "user", "content": "w1"}], tokenize=False) == \
        "<|im_start|>user\nw1<|im_end|>\n"
    b, a = read_state(base), read_state(added)
    reference = weighted([b, a], [n for n in b if "embed" not in n and "lm_head" not in n])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # tokens of both: merged; added ones: the tune's
        reference[name] = torch.cat([(0.6 * b[name] + 0.4 * a[name][:1000]), a[name][1000:]])
    state = read_state(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(state[name], reference[name])
    prompts = ["w1 <extra3> w2", "<extra7> w5 w6 <extra0>"]
    for g, w in zip(logits(out, prompts=prompts), logits(reference, llama_config(1008), prompts, tokenizer_path=added)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_tokenizer_tokens_and_padding(tmp_path, cli, family):
    base, added = family["base"], family["added"]
    config = linear_config([base, added], base_model=str(base), tokenizer={
        "source": "base", "pad_to_multiple_of": 64,
        "tokens": {"<new>": {"source": {"kind": "model_token", "model": str(added), "token": "<extra2>"}},
                   "w7": {"source": {"kind": "zero"}, "force": True}}})
    out = merge(tmp_path, config)
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    assert len(vocab) == 1001 and vocab["<new>"] == 1000 and "<extra2>" not in vocab
    state, a = read_state(out), read_state(added)
    embed = state["model.embed_tokens.weight"]
    assert embed.shape == (1024, 64) and json.loads((out / "config.json").read_text())["vocab_size"] == 1024
    torch.testing.assert_close(embed[1000], a["model.embed_tokens.weight"][1002])
    assert not embed[vocab["w7"]].any()
    torch.testing.assert_close(embed[1001:], embed[:1001].mean(0).expand(23, 64), rtol=1e-5, atol=1e-6)


def test_union_of_reordered_vocabularies_matches_by_token(tmp_path, cli, family):
    """A model whose vocabulary numbers the same tokens differently, plus tokens of its own."""
    import random

    from hf_models import words

    base = family["base"]
    vocab = words(1000)
    body = vocab[3:]
    random.Random(0).shuffle(body)
    other = build_llama(tmp_path / "other", seed=9, vocab=vocab[:3] + body[:990] + [f"v{i}" for i in range(10)])
    out = merge(tmp_path, linear_config([base, other], base_model=str(base), tokenizer_source="union"))
    rows = rows_by_token(read_state(out), out)
    b, o = rows_by_token(read_state(base), base), rows_by_token(read_state(other), other)
    for name, by_token in rows.items():
        assert len(by_token) == 1010
        for token, row in by_token.items():
            if token in b[name] and token in o[name]:
                expected = 0.6 * b[name][token] + 0.4 * o[name][token]
            else:
                expected = (b[name] if token in b[name] else o[name])[token]
            torch.testing.assert_close(row, expected, msg=f"{name} row of {token!r}")


def test_lora_on_vocabulary_tensors_read_through_a_union_vocabulary(tmp_path, cli, family):
    """A LoRA on embed_tokens / lm_head of the model with added tokens: its own rows (merged) and the rows it
    gives the base for the tokens the base lacks both carry the update, as peft's merge_and_unload gives them."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base, added = family["base"], family["added"]
    torch.manual_seed(7)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(added, dtype=torch.float32), peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["embed_tokens", "lm_head", "q_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    tuned = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    b = read_state(base)
    assert not torch.allclose(tuned["lm_head.weight"], read_state(added)["lm_head.weight"], atol=1e-3)
    config = linear_config([base, f"{added}+{tmp_path / 'adapter'}"], base_model=str(base), tokenizer_source="union")
    out = merge(tmp_path, config)
    reference = weighted([b, tuned], [n for n in b if "embed" not in n and "lm_head" not in n])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # tokens of both: merged; added ones: the tune's
        reference[name] = torch.cat([(0.6 * b[name] + 0.4 * tuned[name][:1000]), tuned[name][1000:]])
    state = read_state(out)
    for name, value in reference.items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    prompts = ["w1 <extra3> w2", "<extra7> w5 w6 <extra0>"]
    for g, w in zip(logits(out, prompts=prompts), logits(reference, llama_config(1008), prompts, tokenizer_path=added)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_frankenmerge_with_a_union_tokenizer_loads_and_matches(tmp_path, cli, family):
    """mergekit's two-slice frankenmerge shape with `tokenizer_source: union`: layers stacked and renumbered, the
    embedding from the first slice's model and the head from the last one's, both through the union vocabulary.
    A token the first slice's model lacks takes the row of the model that has it (mergekit, looking only at the
    slice's own sources, gives it zeros); every other tensor equals mergekit's where it is installed."""
    base, added = family["base"], family["added"]
    config = {"merge_method": "passthrough", "dtype": "float32", "tokenizer_source": "union", "base_model": str(base),
              "slices": [{"sources": [{"model": str(base), "layer_range": [0, 2]}]},
                         {"sources": [{"model": str(added), "layer_range": [1, 2]}]}]}
    out = merge(tmp_path, config)
    b, a = read_state(base), read_state(added)
    reference = {n: b[n] for n in b if n.startswith("model.layers.")}
    reference.update({n.replace("layers.1.", "layers.2."): a[n] for n in a if n.startswith("model.layers.1.")})
    reference["model.norm.weight"] = a["model.norm.weight"]
    reference["lm_head.weight"] = a["lm_head.weight"]
    embed = "model.embed_tokens.weight"
    reference[embed] = torch.cat([b[embed], a[embed][1000:]])
    state = read_state(out)
    assert state.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
    written = json.loads((out / "config.json").read_text())
    assert (written["num_hidden_layers"], written["vocab_size"]) == (3, 1008)
    prompts = ["w1 <extra3> w2", "<extra7> w5 w6 <extra0>"]
    want = logits(reference, llama_config(1008, layers=3), prompts, tokenizer_path=added)
    for g, w in zip(logits(out, prompts=prompts), want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    if mergekit_yaml() is None:
        return
    theirs = run_mergekit(tmp_path, config, "mergekit")
    ours_rows, their_rows = rows_by_token(state, out), rows_by_token(read_state(theirs), theirs)
    mk = read_state(theirs)
    for name in state:
        if name not in ours_rows:
            torch.testing.assert_close(state[name], mk[name], rtol=0, atol=0, msg=name)
    for name, rows in ours_rows.items():
        assert rows.keys() == their_rows[name].keys()
        for token, row in rows.items():
            expected = torch.zeros_like(row) if name == embed and token.startswith("<extra") else row
            torch.testing.assert_close(their_rows[name][token], expected, rtol=0, atol=0, msg=f"{name} {token}")


@needs_mergekit
def test_union_and_tied_cases_match_mergekit(tmp_path, cli, family):
    cases = {
        "union": linear_config([family["base"], family["added"]], base_model=str(family["base"]),
                               tokenizer_source="union"),
        "tied": linear_config([family["tied"], family["base"]]),
    }  # scripts/compare_mergekit.py also runs a tied .bin beside tied safetensors
    for name, config in cases.items():
        ours, theirs = merge(tmp_path, config, name), run_mergekit(tmp_path, config, f"{name}-mergekit")
        a, b = rows_by_token(read_state(ours), ours), rows_by_token(read_state(theirs), theirs)
        for tensor in a:
            assert a[tensor].keys() == b[tensor].keys()
            for token in a[tensor]:
                torch.testing.assert_close(a[tensor][token], b[tensor][token], rtol=1e-5, atol=1e-6)
        sa, sb = read_state(ours), read_state(theirs)
        for tensor in sa:
            if tensor not in a:
                torch.testing.assert_close(sa[tensor], sb[tensor], rtol=1e-5, atol=1e-6)


def _names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return list(f.keys())


def test_no_config_is_invented_for_plain_checkpoints(tmp_path, cli):
    from helpers import random_state_dict, save

    a, b = save(random_state_dict(0), tmp_path / "a.safetensors"), save(random_state_dict(1), tmp_path / "b.safetensors")
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump({"models": [str(a), str(b)]}))
    result = cli("merge", config, tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    assert not [p.name for p in (tmp_path / "out").iterdir() if not p.name.endswith((".safetensors", ".json"))
                or p.name in ("config.json", "tokenizer.json")]
    shutil.rmtree(tmp_path / "out")


def test_single_shard_is_model_safetensors_and_stale_weights_are_removed(tmp_path, cli, family):
    """Another run's files must never shadow the new weights: transformers would load them."""
    out = tmp_path / "out"
    shutil.copytree(family["sharded_bf16"], out)  # a previous 5-shard output with its index
    torch.save({"x": torch.zeros(1)}, out / "pytorch_model.bin")
    (out / "notes.txt").write_text("mine")
    models = [family["base"], family["added"]]
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(linear_config(models, base_model=str(models[0]), tokenizer_source="union")))
    result = cli("merge", config, out)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and "model.safetensors.index.json" not in names, names
    assert not [n for n in names if n.startswith("model-") or n.startswith("pytorch_model")], names
    assert "notes.txt" in names  # not a weight file: left alone
    assert "removed" in result.stderr and "pytorch_model.bin" in result.stderr  # listed in the summary
    assert len(logits(out)[0][0]) == 1008  # the new model, with the union vocabulary

    # Sharded again: the single file from before goes, the index and shards are the new ones.
    config.write_text(yaml.safe_dump({**linear_config(models, base_model=str(models[0]), tokenizer_source="union"),
                                      "shard_size": "100KB"}))
    result = run_main("merge", config, out, "--quiet")
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names, names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [n for n in names if n.startswith("model-")]
    assert len(logits(out)[0][0]) == 1008


def test_dry_run_lists_the_model_files_and_the_weight_files_it_would_remove(tmp_path, cli, family):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("pytorch_model.bin", "model-00001-of-00002.safetensors", "config.json", "notes.txt"):
        (out / name).write_text("old")
    before = {p.name: p.read_text() for p in out.iterdir()}
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(linear_config([family["base"], family["added"]], base_model=str(family["base"]),
                                                   tokenizer_source="union")))
    result = cli("merge", config, out, "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in result.stdout.splitlines() if ": " in line}
    assert lines["weight files"] == "model.safetensors"
    assert lines["model files"] == ("config.json (replaces the one there), generation_config.json, "
                                    "tokenizer_config.json, tokenizer.json, README.md")
    assert lines["removed at commit (weight files of another model, which would be loaded instead)"] == \
        "model-00001-of-00002.safetensors, pytorch_model.bin"
    assert "vocab_size = 1008" in lines["config.json"]
    assert {p.name: p.read_text() for p in out.iterdir()} == before  # a dry run touches nothing

    result = run_main("merge", config, out, "--quiet")  # the run does what the dry run said
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(["model.safetensors", "config.json", "notes.txt",
                                                            "generation_config.json", "tokenizer_config.json",
                                                            "tokenizer.json", "README.md"])

    config.write_text(yaml.safe_dump({**linear_config([family["base"], family["added"]], base_model=str(
        family["base"]), tokenizer_source="union"), "shard_size": "100KB"}))
    result = run_main("merge", config, out, "--dry-run")
    assert result.returncode == 0, result.stderr
    weights = next(line for line in result.stdout.splitlines() if line.startswith("weight files: "))
    assert "model-00001-of-" in weights and weights.endswith("model.safetensors.index.json")
    assert "removed at commit (weight files of another model, which would be loaded instead): model.safetensors" \
        in result.stdout


@pytest.mark.parametrize("slow_files", [["tokenizer.model"], ["vocab.json", "merges.txt"]])
def test_a_slow_tokenizer_gets_a_clear_error_for_a_tokenizer_merge(tmp_path, cli, family, slow_files):
    """Only tokenizer.json can be merged; a model with slow tokenizer files only is named, with what to do. A chat
    template alone needs no fast tokenizer: it goes into the slow tokenizer's config."""
    def slow_copy(model: Path, name: str) -> Path:
        shutil.copytree(model, tmp_path / name)
        (tmp_path / name / "tokenizer.json").unlink()
        for f in slow_files:
            (tmp_path / name / f).write_bytes(b"\0slow tokenizer data")
        return tmp_path / name

    slow = slow_copy(family["added"], "slow")
    config = linear_config([family["base"], slow], base_model=str(family["base"]), tokenizer_source="union")
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(config))
    result = cli("merge", path, tmp_path / "out")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert f"'{slow}' has only a slow tokenizer ({slow_files[0]}" in message and "no tokenizer.json" in message
    assert "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)" in message
    assert not (tmp_path / "out").exists()

    slow = slow_copy(family["base"], "slow-base")
    out = merge(tmp_path, {**linear_config([slow, family["base"]]), "chat_template": "chatml"}, "templated")
    for name in slow_files:
        assert (out / name).read_bytes() == (slow / name).read_bytes()
    assert not (out / "tokenizer.json").exists()
    template = json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    assert template.startswith("{% for message in messages %}{{ '<|im_start|>'")
    assert (out / "chat_template.jinja").read_text() == template


def test_merging_into_an_input_directory_is_refused(tmp_path, cli, family):
    models = [build_llama(tmp_path / "a", seed=0, fmt="bin"), family["base"]]
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(linear_config(models)))
    result = cli("merge", config, models[0])  # its pytorch_model.bin would be removed as stale
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (models[0] / "pytorch_model.bin").exists()
