"""How a Hugging Face model's tensors look to a merge, given its config.json.

Tied embeddings: a model saved with `tie_word_embeddings: true` has no output embedding (`lm_head.weight`) in
its safetensors, because it is the input embedding. When another model of the merge has a real one, the tied
model contributes its input embedding there, as mergekit does (the same mapped tensor under a second name, so
nothing is copied). When every model is tied, nothing is added and the output stays tied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from streammerge.io import Checkpoint

# (output embedding, input embedding) name pairs that transformers ties.
TIED_PAIRS = (("lm_head.weight", "model.embed_tokens.weight"), ("lm_head.weight", "transformer.wte.weight"),
              ("embed_out.weight", "gpt_neox.embed_in.weight"), ("lm_head.weight", "model.embed_in.weight"))


def model_directory(path: Path) -> Path | None:
    """The Hugging Face model directory a checkpoint belongs to (one with a config.json naming a model_type)."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    config = read_model_config(directory)
    return directory if config is not None else None


def read_model_config(directory: Path | None) -> dict | None:
    if directory is None:
        return None
    try:
        config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and "model_type" in config else None


def is_tied(config: dict | None) -> bool:
    """Whether a model's config ties its embeddings (transformers' default when the key is absent)."""
    return config is not None and bool(config.get("tie_word_embeddings", True))


@dataclass
class TiedHeads:
    """What tying did to the inputs: names added (per checkpoint) and whether the output is tied."""

    added: dict[int, list[str]]  # checkpoint index -> output-embedding names it now contributes
    output_tied: bool | None  # None: not Hugging Face models


def untie_for_merge(checkpoints: list[Checkpoint], configs: list[dict | None]) -> TiedHeads:
    """Give tied models their output embedding when some other model has a real one."""
    if not any(c is not None for c in configs):
        return TiedHeads({}, None)
    added: dict[int, list[str]] = {}
    for head, embedding in TIED_PAIRS:
        if not any(head in c.tensors for c in checkpoints):
            continue  # every model is tied (or none has this pair): the output keeps it tied
        for i, (checkpoint, config) in enumerate(zip(checkpoints, configs)):
            if head not in checkpoint.tensors and embedding in checkpoint.tensors and is_tied(config):
                checkpoint.tensors[head] = checkpoint.tensors[embedding]
                added.setdefault(i, []).append(head)
    return TiedHeads(added, all(is_tied(c) for c in configs))
