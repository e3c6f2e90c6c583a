"""LoRA: `MODEL+ADAPTER` references applied while streaming (checked against peft's merge_and_unload), and
`extract-lora` adapters that peft loads (checked by the logits they reproduce)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import save_file

from helpers import load_output, merge_in_process
from safety_support import run_main  # the command line's code path, in this process
from streammerge.lora import LowRankDelta

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
PROMPT = torch.tensor([[1, 5, 9, 2, 33, 17, 4, 60, 100, 7]])


def llama_config():
    return transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                    max_position_embeddings=64)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "base"
    transformers.LlamaForCausalLM(llama_config()).save_pretrained(path)
    return path


def load_model(path):
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)


def make_adapter(base_dir, path, **lora):
    """A PEFT adapter with random (non-zero) factors, saved by peft itself; returns the merged state dict."""
    torch.manual_seed(3)
    model = peft.get_peft_model(load_model(base_dir), peft.LoraConfig(init_lora_weights=False, **lora))
    model.save_pretrained(path)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("lora", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    dict(r=6, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "o_proj", "embed_tokens", "lm_head"],
         rank_pattern={"o_proj": 2}, alpha_pattern={"lm_head": 16}),
])
@pytest.mark.parametrize("chunk", [None, 1000])  # 1000 elements: chunks start and end inside rows
def test_model_plus_lora_equals_peft_merge(tmp_path, base_dir, lora, chunk):
    merged = make_adapter(base_dir, tmp_path / "adapter", **lora)
    out = tmp_path / "out.safetensors"
    merge_in_process({"method": "passthrough", "output": str(out),
                      "models": [{"path": f"{base_dir}+{tmp_path / 'adapter'}"}]}, chunk=chunk)
    got = load_output(out)
    assert set(got) == set(merged)
    for name, value in merged.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_lora_reference_in_a_mergekit_linear_merge_loads_and_matches(tmp_path, base_dir, cli):
    merged = make_adapter(base_dir, tmp_path / "adapter", r=4, lora_alpha=4, target_modules=["k_proj", "up_proj"])
    base = load_model(base_dir).state_dict()
    config = {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": f"{base_dir}+{tmp_path / 'adapter'}", "parameters": {"weight": 0.75}},
        {"model": str(base_dir), "parameters": {"weight": 0.25}}]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    result = cli("merge", tmp_path / "c.yml", "--output", tmp_path / "out", "--quiet", "--max-ram", "300MiB")
    assert result.returncode == 0, result.stderr
    expected = {k: 0.75 * merged[k] + 0.25 * base[k] for k in base}
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    reference = transformers.LlamaForCausalLM(llama_config())
    reference.load_state_dict(expected)
    with torch.no_grad():
        torch.testing.assert_close(model(PROMPT).logits, reference(PROMPT).logits, rtol=1e-4, atol=1e-5)


def test_low_rank_update_of_any_element_range():
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(37, 5, generator=g), torch.randn(5, 23, generator=g)
    dense = (left @ right * 0.7).reshape(-1)
    delta = LowRankDelta(left, right, 0.7, "x")
    for start, stop in [(0, dense.numel()), (5, 6), (3, 400), (23, 46), (22, 47), (100, 851)]:
        for scratch_size in (8, 64, 4096):
            out = torch.zeros(stop - start)
            delta.add_to(out, start, stop, torch.empty(scratch_size))
            torch.testing.assert_close(out, dense[start:stop], rtol=1e-5, atol=1e-6)


def write_adapter(path, tensors, **config):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))


def test_fan_in_fan_out_layers_get_the_transposed_update(tmp_path):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(12, 20, generator=g)  # GPT-2 Conv1D: stored as (in, out)
    a, b = torch.randn(3, 12, generator=g), torch.randn(20, 3, generator=g)
    save_file({"h.0.attn.c_attn.weight": weight}, tmp_path / "model.safetensors")
    write_adapter(tmp_path / "ad", {"base_model.model.h.0.attn.c_attn.lora_A.weight": a,
                                    "base_model.model.h.0.attn.c_attn.lora_B.weight": b},
                  r=3, lora_alpha=6, fan_in_fan_out=True)
    merge_in_process({"method": "passthrough", "output": str(tmp_path / "o.safetensors"),
                      "models": [{"path": str(tmp_path / "model.safetensors"), "lora": str(tmp_path / "ad")}]})
    torch.testing.assert_close(load_output(tmp_path / "o.safetensors")["h.0.attn.c_attn.weight"],
                               weight + 2.0 * (b @ a).t(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tensors, config, message", [
    ({"base_model.model.x.lora_A.weight": torch.ones(2, 4), "base_model.model.x.lora_B.weight": torch.ones(4, 2),
      "base_model.model.x.lora_magnitude_vector": torch.ones(4)}, {"use_dora": True}, "DoRA"),
    ({"base_model.model.y.lora_A.weight": torch.ones(2, 4), "base_model.model.y.lora_B.weight": torch.ones(4, 2)},
     {}, "'y.weight', which"),
    ({"base_model.model.x.lora_A.weight": torch.ones(2, 5), "base_model.model.x.lora_B.weight": torch.ones(4, 2)},
     {}, "4 x 5"),
    ({"base_model.model.x.lora_A.weight": torch.ones(2, 4)}, {}, "partner"),
])
def test_unusable_adapters_are_refused_with_a_message(tmp_path, tensors, config, message):
    save_file({"x.weight": torch.ones(4, 4)}, tmp_path / "m.safetensors")
    write_adapter(tmp_path / "ad", tensors, r=2, lora_alpha=2, **config)
    (tmp_path / "c.yml").write_text(yaml.safe_dump({"method": "passthrough", "models": [
        {"path": f"{tmp_path / 'm.safetensors'}+{tmp_path / 'ad'}"}]}))
    result = run_main("merge", tmp_path / "c.yml", "--output", tmp_path / "o.safetensors", "--quiet")
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_missing_adapter_directory_is_a_clean_error(tmp_path, base_dir):
    (tmp_path / "c.yml").write_text(yaml.safe_dump({"method": "passthrough", "models": [
        {"path": str(base_dir), "lora": str(tmp_path / "nowhere")}]}))
    result = run_main("merge", tmp_path / "c.yml", "--output", tmp_path / "o.safetensors", "--quiet")
    assert result.returncode == 1 and "adapter_config.json" in result.stderr, result.stderr


# -- extract-lora -----------------------------------------------------------------------------------------------
TRUE_RANK = 4


@pytest.fixture(scope="module")
def finetune(tmp_path_factory, base_dir):
    """The base plus a rank-4 update of every weight matrix, tiny full-rank noise, and changed norms."""
    model = load_model(base_dir)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p += (torch.randn(p.shape[0], TRUE_RANK, generator=g) @ torch.randn(TRUE_RANK, p.shape[1], generator=g)
                      ) * 0.02 + torch.randn(p.shape, generator=g) * 1e-6
            else:
                p += torch.randn(p.shape, generator=g) * 0.05
    path = tmp_path_factory.mktemp("ft") / "ft"
    model.save_pretrained(path)
    return path


def optimal_error(finetune, base_dir, rank) -> float:
    """The relative Frobenius error of the best rank-`rank` approximation of every weight difference."""
    ft, base = load_model(finetune).state_dict(), load_model(base_dir).state_dict()
    rest = total = 0.0
    for name, value in ft.items():
        if value.dim() == 2:
            s = torch.linalg.svdvals((value - base[name]).double())
            rest += float((s[rank:] ** 2).sum())
            total += float((s ** 2).sum())
    return math.sqrt(rest / total)


def adapter_error(adapter, finetune, base_dir) -> float:
    """The relative Frobenius error of the adapter's updates against the weight differences."""
    factors = load_output(adapter / "adapter_model.safetensors")
    ft, base = load_model(finetune).state_dict(), load_model(base_dir).state_dict()
    rest = total = 0.0
    for name, value in ft.items():
        if value.dim() != 2:
            continue
        key = "base_model.model." + name.removesuffix(".weight")
        if f"{key}.lora_A.weight" in factors:
            update = factors[f"{key}.lora_B.weight"] @ factors[f"{key}.lora_A.weight"]
        else:
            update = (factors[f"{key}.lora_embedding_B"] @ factors[f"{key}.lora_embedding_A"]).t()
        delta = (value - base[name]).double()
        rest += float(((delta - update.double()) ** 2).sum())
        total += float((delta ** 2).sum())
    return math.sqrt(rest / total)


@pytest.mark.parametrize("rank", [2, TRUE_RANK])
def test_extracted_adapter_loads_in_peft_and_reproduces_the_finetune(tmp_path, base_dir, finetune, cli, rank):
    result = cli("extract-lora", finetune, base_dir, "--rank", rank, "--output", tmp_path / "adapter",
                 "--max-ram", "300MiB", "--report", tmp_path / "report.json")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["peak_anon_bytes"] <= report["max_ram_bytes"]
    assert report["modules"] == 2 * 7 + 2 and report["not_representable"] == []
    # the adapter's updates are as good as the exact truncated SVD of each difference
    best = optimal_error(finetune, base_dir, rank)
    achieved = adapter_error(tmp_path / "adapter", finetune, base_dir)
    assert best * (1 - 1e-4) <= achieved <= best * 1.01 + 1e-6
    assert report["relative_error"] == pytest.approx(achieved, rel=1e-2, abs=1e-7)
    model = peft.PeftModel.from_pretrained(load_model(base_dir), tmp_path / "adapter")
    with torch.no_grad():
        got = model(PROMPT).logits
        want = load_model(finetune)(PROMPT).logits
        untouched = load_model(base_dir)(PROMPT).logits
    error = float((got - want).norm() / want.norm())
    print(f"rank {rank}: weight error {report['relative_error']:.2e}, logits relative error {error:.2e} "
          f"(base model: {float((untouched - want).norm() / want.norm()):.2e})")
    if rank >= TRUE_RANK:
        assert error < 1e-3
    else:
        assert 1e-2 < error < float((untouched - want).norm() / want.norm())


def test_extract_lora_of_identical_models_is_a_clean_error(tmp_path, base_dir):
    result = run_main("extract-lora", base_dir, base_dir, "--rank", 4, "--output", tmp_path / "adapter")
    assert result.returncode == 1 and "no difference" in result.stderr, result.stderr
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()
