"""The files beside the weights that make a directory output a model transformers loads.

- `config.json`: the donor's (the base model, else the first model), edited as JSON so that every field it has
  is kept as written, with the fields the merge changes updated: the dtype (`torch_dtype` or `dtype`, whichever
  the donor uses), `vocab_size` for a tokenizer merge, `tie_word_embeddings`, and whatever the plan changes
  (`Plan.config_updates`, e.g. `num_hidden_layers` when layers are stacked or cut).
- `generation_config.json`: the donor's, when it has one.
- The tokenizer: the one built for a tokenizer merge; else the donor's tokenizer files as they are (its
  tokenizer_config.json rewritten only to set a `chat_template`).
- `README.md`: a model card stating the recipe, the inputs and the config as run.
Only files an input has are written (no config.json is invented for inputs that have none).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from streammerge import __version__

GENERATION_CONFIG = "generation_config.json"
DTYPE_KEYS = ("torch_dtype", "dtype")
HUB_CACHE_PATH = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]+)/?$")


def updated_config(config: dict, updates: dict) -> dict:
    """A model config with fields replaced; the dtype goes under whichever of `torch_dtype` / `dtype` the
    config uses (transformers 4 writes the first, 5 the second), `torch_dtype` when it has neither."""
    out = dict(config)
    for key, value in updates.items():
        if key in DTYPE_KEYS:
            present = [k for k in DTYPE_KEYS if k in out] or ["torch_dtype"]
            for k in present:
                out[k] = value
        else:
            out[key] = value
    return out


def output_dtype(plan) -> torch.dtype:
    """The dtype most of the output's float bytes have."""
    weights: dict[torch.dtype, int] = {}
    for task in plan.tasks:
        if task.out_dtype.is_floating_point:
            weights[task.out_dtype] = weights.get(task.out_dtype, 0) + task.out_bytes * (1 + len(task.aliases))
    return max(weights, key=weights.get) if weights else torch.float32


def model_files(prepared) -> dict[str, bytes]:
    """Name -> content of every file a directory output gets besides its weights (empty when the inputs are
    not Hugging Face models)."""
    hf = prepared.hf
    if hf is None or hf.donor_directory is None or hf.configs[hf.donor] is None:
        return {}
    donor = hf.donor_directory
    updates = {"torch_dtype": str(output_dtype(prepared.plan)).removeprefix("torch."), **hf.config_updates,
               **getattr(prepared.plan, "config_updates", {})}
    files = {"config.json": (json.dumps(updated_config(hf.configs[hf.donor], updates), indent=2) + "\n").encode()}
    if (donor / GENERATION_CONFIG).is_file():
        files[GENERATION_CONFIG] = (donor / GENERATION_CONFIG).read_bytes()
    files.update(tokenizer_files(hf, donor, str(prepared.config.source or "config")))
    files["README.md"] = model_card(prepared).encode()
    return files


def tokenizer_files(hf, donor: Path, where: str) -> dict[str, bytes]:
    """The tokenizer built for the merge, else the donor's files as they are (its tokenizer_config.json
    rewritten only to set a chat template)."""
    from streammerge.hf.tokenizer import TOKENIZER_FILES, FastTokenizer

    if hf.vocabulary is not None:
        return hf.vocabulary.tokenizer.files(hf.chat_template)
    if hf.chat_template is not None and (donor / "tokenizer.json").is_file():
        return FastTokenizer.load(donor, where).files(hf.chat_template)
    files = {name: (donor / name).read_bytes() for name in TOKENIZER_FILES if (donor / name).is_file()}
    if hf.chat_template is not None and files:  # a slow tokenizer: the template goes into its config as JSON
        config = json.loads(files.get("tokenizer_config.json", b"{}"))
        files["tokenizer_config.json"] = (json.dumps({**config, "chat_template": hf.chat_template}, indent=2,
                                                     ensure_ascii=False) + "\n").encode()
        files["chat_template.jinja"] = hf.chat_template.encode()
        files.pop("chat_template.json", None)
    return files


def describe_input(path: Path) -> str:
    """A path, or `org/name@commit` for a snapshot in the Hugging Face cache."""
    match = HUB_CACHE_PATH.search(str(path))
    return f"{match['org']}/{match['name']}@{match['commit'][:12]}" if match else str(path)


def model_card(prepared) -> str:
    config = prepared.config
    recipe = config.recipe()
    lines = ["---", "library_name: transformers", "tags:", "- merge", "- streammerge", "---", "",
             f"# {Path(prepared.output).name}", "",
             f"A merge of {len(config.models)} model(s) made with streammerge {__version__}, method "
             f"`{config.method.name}`" + (f" onto the base model {describe_input(config.base.path)}." if config.base
                                          else "."), "", "## Inputs", ""]
    for spec in config.models:
        params = ", ".join(f"{k}={v}" for k, v in spec.params.items())
        lines.append(f"- {describe_input(spec.path)}" + (f" ({params})" if params else ""))
    if config.base is not None:
        lines.append(f"- base: {describe_input(config.base.path)}")
    lines += ["", "## Recipe", "", "```json", json.dumps(recipe, indent=2, sort_keys=True), "```"]
    if prepared.hf is not None and prepared.hf.vocabulary is not None:
        lines += ["", f"Tokenizer: `{config.tokenizer.source}` ({prepared.hf.vocabulary.size} rows)."]
    source = _config_text(config.source)
    if source is not None:
        lines += ["", "## Configuration", "", "The config as run:", "",
                  f"```{'json' if str(config.source).endswith('.json') else 'yaml'}", source.rstrip("\n"), "```"]
    return "\n".join(lines) + "\n"


def _config_text(source: Path | None) -> str | None:
    if source is None:
        return None
    try:
        return Path(source).read_text(encoding="utf-8")
    except OSError:
        return None
