"""Small Llama-architecture models saved the way transformers saves them, built offline for tests.

Random weights, a tiny config, a word-level tokenizer made with `tokenizers` (no download). Fine-tunes are
the base plus small noise, so task-vector merges are meaningful. Layouts: one `model.safetensors`, sharded
safetensors with an index, `pytorch_model.bin` (a torch.save of the state dict: a tied `lm_head.weight`
shares storage with the embedding, as transformers' .bin files do); float32/float16/bfloat16; tied or untied
embeddings; added tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
SPECIAL = ["<unk>", "<s>", "</s>"]
PROMPTS = ["w1 w2 w3 w4 w5", "w10 w20 w30 w40 w50 w60 w70", "w999 w0 w5 w7"]


def words(vocab_size: int, prefix: str = "w") -> list[str]:
    return SPECIAL + [f"{prefix}{i}" for i in range(vocab_size - len(SPECIAL))]


def make_tokenizer(vocab: list[str], added_tokens: list[str] = (), chat_template: str | None = None):
    """A word-level fast tokenizer over `vocab` (ids in list order), with `added_tokens` after it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if added_tokens:
        fast.add_tokens(list(added_tokens))
    if chat_template:
        fast.chat_template = chat_template
    return fast


def llama_config(vocab_size: int, tie: bool = False, layers: int = LAYERS, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                       num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                       max_position_embeddings=128, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                       dtype=str(dtype).removeprefix("torch."))


def save_model(path: Path, state: dict[str, torch.Tensor], config, tokenizer=None, fmt: str = "safetensors",
               shard_size: str | int | None = None, generation_config: bool = True) -> Path:
    """Save `state` as a transformers model directory: fmt 'safetensors' (sharded when shard_size is given)
    or 'bin' (pytorch_model.bin written by torch.save, a tied lm_head included as shared storage)."""
    from transformers import GenerationConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, assign=True, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    if fmt == "bin":
        config.architectures = ["LlamaForCausalLM"]
        config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    else:
        model.save_pretrained(path, **({"max_shard_size": shard_size} if shard_size else {}))
    (path / "generation_config.json").unlink(missing_ok=True)
    if generation_config:
        GenerationConfig(bos_token_id=1, eos_token_id=2, max_new_tokens=8).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def random_state(config, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights for `config` (lm_head omitted when tied)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norms away from exactly 1 so merging them is visible
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    state = {k: v.detach().clone().to(dtype) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def build_llama(path: Path, seed: int = 0, vocab_size: int = 1000, tie: bool = False,
                dtype: torch.dtype = torch.float32, fmt: str = "safetensors", shard_size=None,
                added_tokens: list[str] = (), vocab: list[str] | None = None, layers: int = LAYERS,
                like: Path | None = None, noise: float = 0.02, chat_template: str | None = None,
                generation_config: bool = True, tokenizer: bool = True) -> Path:
    """A small Llama model directory. With `like`, a fine-tune of that model: its weights plus `noise`
    (relative), the new rows of added tokens random."""
    vocab = vocab or words(vocab_size)
    total = len(vocab) + len(added_tokens)
    config = llama_config(total, tie=tie, layers=layers, dtype=dtype)
    state = random_state(config, seed, torch.float32)
    if like is not None:
        parent = read_state(like)
        g = torch.Generator().manual_seed(seed + 1000)
        for name, value in state.items():
            if name not in parent:
                continue
            old = parent[name].float()
            rows = min(old.shape[0], value.shape[0])
            value[:rows] = old[:rows] + noise * old[:rows].std() * torch.randn(old[:rows].shape, generator=g)
    state = {k: v.to(dtype) for k, v in state.items()}
    tok = make_tokenizer(vocab, added_tokens, chat_template) if tokenizer else None
    return save_model(path, state, config, tok, fmt, shard_size, generation_config)


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory (safetensors, sharded or .bin), with lm_head filled in from the
    embedding when the config ties them and the file lacks it."""
    path = Path(path)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    for f in sorted(path.glob("pytorch_model*.bin")):
        state.update(torch.load(f, weights_only=True, map_location="cpu"))
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    if "lm_head.weight" not in state and config.get("tie_word_embeddings"):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def logits(path_or_state, config=None, prompts: list[str] = PROMPTS, tokenizer_path: Path | None = None):
    """Logits of a model on fixed prompts: from a directory (from_pretrained, AutoTokenizer), or from an
    in-memory state dict with a config (the reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if config is None:
        model = AutoModelForCausalLM.from_pretrained(path_or_state, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path_or_state)
    else:
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in path_or_state.items()}, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        if config.tie_word_embeddings:
            model.tie_weights()
        model = model.float()
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    model.eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out.append(model(ids).logits[0])
    return out


def put_in_hub_cache(model_dir: Path, hf_home: Path, repo_id: str, revision: str = "main",
                     commit: str | None = None) -> Path:
    """Lay out `model_dir` in a Hugging Face cache under `hf_home` as huggingface_hub does: content-addressed
    blobs, a snapshot directory per commit of symlinks to them, and refs/REVISION naming the commit."""
    import hashlib

    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = commit or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(model_dir).iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def rows_by_token(state: dict[str, torch.Tensor], tokenizer_dir: Path,
                  names=("model.embed_tokens.weight", "lm_head.weight")) -> dict[str, dict[str, torch.Tensor]]:
    """Vocabulary-indexed rows keyed by token text: outputs whose tokenizers number added tokens differently
    compare token by token."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(tokenizer_dir).get_vocab()
    return {n: {t: state[n][i] for t, i in vocab.items() if i < state[n].shape[0]} for n in names if n in state}
