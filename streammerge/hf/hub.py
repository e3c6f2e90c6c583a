"""Hub ids (`org/name`, `org/name@revision`) as local directories, through huggingface_hub.

The local cache comes first (nothing is contacted when the files are there); otherwise, when online, only the
files a merge uses are downloaded: weights (safetensors preferred over .bin when a repository has both), the
config, the generation config and the tokenizer. Offline and not cached is an error naming the id.
"""

from __future__ import annotations

import re
from pathlib import Path

from streammerge.errors import ConfigError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
METADATA_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                  "vocab.txt", "spiece.model", "chat_template.jinja", "chat_template.json", "adapter_config.json"]
SAFETENSORS_FILES = ["*.safetensors", "*.safetensors.index.json"]
BIN_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json", "adapter_model.bin"]
WEIGHT_SUFFIXES = (".safetensors", ".bin")
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".json")


def split_reference(reference: str, revision: str | None = None) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); an explicit `revision` wins over none in the text."""
    if "@" in reference:
        reference, _, in_text = reference.partition("@")
        revision = revision or in_text or None
    return reference, revision


def is_hub_id(reference: str) -> bool:
    return bool(HUB_ID.match(split_reference(reference)[0])) and not Path(reference).exists()


def looks_like_hub_id(reference: str) -> bool:
    """A path in a streammerge config that is meant as a Hub id: shaped `org/name[@revision]`, not on disk, its
    `org` not a local directory and its name not a checkpoint file (`ckpts/a.pth` missing stays a missing file)."""
    repo_id = split_reference(reference)[0]
    return (is_hub_id(reference) and not Path(repo_id.split("/")[0]).is_dir()
            and not repo_id.lower().endswith(CHECKPOINT_SUFFIXES))


def resolve(reference: str, where: str, revision: str | None = None) -> Path:
    """A local path as it is, or the local snapshot of a Hub model (from the cache, else downloaded)."""
    if Path(reference).exists() and revision is None:
        return Path(reference)
    repo_id, revision = split_reference(reference, revision)
    if not HUB_ID.match(repo_id):
        raise ConfigError(f"{where}: '{reference}' is neither a local file or directory nor a Hugging Face Hub id "
                          "(org/name or org/name@revision). Check the path.")
    label = f"'{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    try:
        import huggingface_hub
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise ConfigError(f"{where}: {label} is a Hugging Face Hub id, which needs the huggingface_hub package: "
                          "pip install 'streammerge[hf]' (or give a local directory).") from None
    try:
        local = Path(snapshot_download(repo_id, revision=revision, local_files_only=True,
                                       allow_patterns=METADATA_FILES + SAFETENSORS_FILES + BIN_FILES))
        if _has_weights(local):
            return local
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        pass
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{where}: the Hub model {label} is not in the local Hugging Face cache "
                          f"({constants.HF_HUB_CACHE}) and offline mode is on (HF_HUB_OFFLINE). Download it where "
                          "the Hub can be reached (`hf download ...`), point HF_HOME at a cache that holds it, or "
                          "give a local directory.")
    try:
        files = huggingface_hub.list_repo_files(repo_id, revision=revision)
        weights = SAFETENSORS_FILES if any(f.endswith(".safetensors") for f in files) else BIN_FILES
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=METADATA_FILES + weights))
    except (HfHubHTTPError, OSError, ValueError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{where}: could not get the Hub model {label} ({detail}). Check the id, the revision, "
                          "your network and, for gated or private models, your token (`hf auth login`); or give "
                          "a local directory.") from None
    except Exception as exc:  # connection errors come from the HTTP client, whose classes vary by version
        raise ConfigError(f"{where}: could not download the Hub model {label} ({type(exc).__name__}: {exc}). "
                          "Check your network, or give a local directory.") from None


def _has_weights(directory: Path) -> bool:
    return any(p.name.endswith(WEIGHT_SUFFIXES) for p in directory.iterdir())
