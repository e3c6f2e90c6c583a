"""The merge's inputs as Hugging Face models: their config.json, tied embeddings, and the output vocabulary.

Runs before the plan, on headers alone (tokenizers aside): tied models get their output embedding where
another model has a real one, vocabulary-indexed tensors are replaced by views through the output vocabulary,
and the fields of the output's config.json that the merge changes are collected.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from streammerge.hf.views import TiedHeads, model_directory, read_model_config, untie_for_merge
from streammerge.io import Checkpoint


@dataclass
class HFInputs:
    directories: list[Path | None]  # per input (models, then the base): its model directory, if any
    configs: list[dict | None]  # per input: its config.json
    donor: int  # the input whose config, generation config and tokenizer the output takes
    tied: TiedHeads
    vocabulary: object | None = None  # tokenizer.Vocabulary when the config asks for a tokenizer
    chat_template: str | None = None
    config_updates: dict = field(default_factory=dict)  # config.json field -> new value
    warnings: list[str] = field(default_factory=list)

    @property
    def donor_directory(self) -> Path | None:
        return self.directories[self.donor]


def _same(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def prepare_inputs(config, checkpoints: list[Checkpoint], base: Checkpoint | None) -> HFInputs | None:
    """None when no input is a Hugging Face model directory and no tokenizer is asked for."""
    inputs = checkpoints + ([base] if base is not None else [])
    specs = config.models + ([config.base] if base is not None else [])
    directories = [model_directory(spec.path) for spec in specs]
    if not any(directories) and config.tokenizer is None:
        return None
    configs = [read_model_config(d) for d in directories]
    donor_path = config.donor or (config.base.path if config.base is not None else config.models[0].path)
    donor = next((i for i, s in enumerate(specs) if _same(s.path, donor_path)), None)
    if donor is None:  # a donor that is not merged (e.g. mergekit's base_model of a linear merge)
        extra_donor = model_directory(donor_path)
        directories.append(extra_donor)
        configs.append(read_model_config(extra_donor))
        donor = len(directories) - 1
    tied = untie_for_merge(inputs, configs[:len(inputs)])
    hf = HFInputs(directories, configs, donor, tied)
    if tied.output_tied is not None and configs[donor] is not None:
        if bool(configs[donor].get("tie_word_embeddings", True)) != tied.output_tied:
            hf.config_updates["tie_word_embeddings"] = tied.output_tied
    if config.tokenizer is not None:
        _apply_vocabulary(config, hf, inputs, specs)
    if config.chat_template is not None:
        hf.chat_template = _chat_template(config.chat_template, hf, str(config.source or "config"))
    return hf


def _apply_vocabulary(config, hf: HFInputs, inputs: list[Checkpoint], specs) -> None:
    from streammerge.errors import ConfigError
    from streammerge.hf.tokenizer import build_vocabulary
    from streammerge.hf.vocab import VocabRows, vocabulary_tensors

    where = str(config.source or "config")
    for spec, directory in zip(specs, hf.directories[:len(inputs)]):
        if directory is None:
            raise ConfigError(f"{where}: a tokenizer merge needs Hugging Face model directories (config.json and "
                              f"tokenizer files), but '{spec.path}' is not one.")
    sizes = [_vocab_size(c, cfg) for c, cfg in zip(inputs, hf.configs)]
    preferred = config.donor or (config.base.path if config.base is not None else None)
    base_index = next((i for i, s in enumerate(specs) if preferred is not None and _same(s.path, preferred)), None)
    donor = hf.donor if hf.donor < len(inputs) else 0  # a donor outside the merge has no rows to give
    vocabulary = build_vocabulary(config.tokenizer, hf.directories[:len(inputs)], sizes, donor, base_index, where)
    hf.vocabulary = vocabulary
    hf.warnings.extend(vocabulary.warnings)
    hf.config_updates["vocab_size"] = vocabulary.size
    originals = [dict(c.tensors) for c in inputs]
    for i, checkpoint in enumerate(inputs):
        names = vocabulary_tensors(originals[i], vocabulary.model_vocab_sizes[i])
        if not names:
            raise ConfigError(f"{where}: '{specs[i].path}' has no token embedding with {sizes[i]} rows (its "
                              "vocab_size); a tokenizer merge needs the token embedding of every model.")
        for name in names:
            others = [o.get(name) for o in originals]
            checkpoint.tensors[name] = VocabRows.of(originals[i][name], vocabulary.rows[i], others)


def _vocab_size(checkpoint: Checkpoint, config: dict | None) -> int | None:
    """The model's vocab_size (config.json), else the rows of its token embedding."""
    from streammerge.hf.vocab import VOCAB_TENSOR

    if config and isinstance(config.get("vocab_size"), int):
        return config["vocab_size"]
    return next((info.shape[0] for n, info in checkpoint.tensors.items()
                 if VOCAB_TENSOR.search(n) and len(info.shape) == 2), None)


def _chat_template(value: str, hf: HFInputs, where: str) -> str | None:
    from streammerge.hf.tokenizer import FastTokenizer, chat_template_text

    if value != "auto":
        return chat_template_text(value, where)
    found = []  # the most common template among the models' tokenizers, as mergekit's "auto"
    for directory in hf.directories:
        if directory is None or not (Path(directory) / "tokenizer.json").is_file():
            continue
        template = FastTokenizer.load(directory, where).chat_template
        if template:
            found.append(template.strip())
    return Counter(found).most_common(1)[0][0] if found else None
