"""Hugging Face sharded checkpoints: `*.index.json` = {"metadata": {...}, "weight_map": {name: shard file}}."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from streammerge.errors import CheckpointError, short
from streammerge.files import read_regular_file
from streammerge.memory import check_parse_room
from streammerge.io.checkpoint import Checkpoint, clean_text, is_valid_text, open_checkpoint, register_format, sniff_format
from streammerge.io.safetensors_io import DuplicateKeyError, loads_strict

MAX_INDEX = 100_000_000


def _sniff(head: bytes, path: Path) -> bool:
    return path.name.endswith(".json") and head.lstrip()[:1] == b"{"


def _is_local_name(name: str) -> bool:
    """A shard must sit beside its index (or below it): no absolute paths, no '..', no empty names."""
    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts and "\0" not in name


def read_weight_map(index: Path) -> dict:
    """The `weight_map` of a shard index (tensor name -> shard file), unvalidated; {} when it cannot be read.
    For tidying and walking directories; `open_sharded` is the validating reader."""
    try:
        weight_map = json.loads(read_regular_file(index, MAX_INDEX, "shard index", CheckpointError)
                                .decode("utf-8")).get("weight_map", {})
        return weight_map if isinstance(weight_map, dict) else {}
    except (CheckpointError, ValueError, AttributeError, RecursionError):
        return {}


def open_sharded(path: Path, **options) -> Checkpoint:
    raw = read_regular_file(path, MAX_INDEX, "shard index", CheckpointError)
    check_parse_room(path, "shard index", len(raw), options.get("max_ram"))
    try:
        index = loads_strict(raw.decode("utf-8"))
    except DuplicateKeyError as exc:
        raise CheckpointError(f"{path}: the shard index names {short(exc.args[0])} twice.") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise CheckpointError(f"{path}: not a readable shard index ({detail}).") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: a shard index needs a non-empty 'weight_map' of tensor name -> shard file.")
    for tensor_name, shard_name in weight_map.items():
        if not isinstance(shard_name, str) or not _is_local_name(shard_name) or not is_valid_text(shard_name):
            raise CheckpointError(f"{path}: the index maps {short(tensor_name)} to {short(shard_name)}, which is not "
                                  "the name of a file beside the index. Fix the index or re-download it.")
    index_metadata = index.get("metadata") or {}
    if not isinstance(index_metadata, dict):
        raise CheckpointError(f"{path}: the index's 'metadata' must be a mapping.")
    shard_names = sorted(set(weight_map.values()))
    shards = []
    try:
        for name in shard_names:
            shard_path = path.parent / name
            if not shard_path.is_file():
                raise CheckpointError(f"{path}: the index lists shard {short(name)}, which does not exist next to it (or is not a file). "
                                      "Download the missing shard or fix the index.")
            if sniff_format(shard_path)[0] is FORMAT:  # never follow an index from an index (no cycles)
                what = "the index itself" if shard_path.resolve() == path.resolve() else "another shard index"
                raise CheckpointError(f"{path}: the index lists {short(name)} as a shard, but that is {what}, not a "
                                      "file of tensors. Fix the index's weight_map or re-download it.")
            shards.append(open_checkpoint(shard_path, **options))
        tensors, files = {}, []
        for name, shard in zip(shard_names, shards):
            files.extend(shard.files)
            for tensor_name, info in shard.tensors.items():
                if weight_map.get(tensor_name) == name:
                    tensors[tensor_name] = info
        missing = [n for n in weight_map if n not in tensors]
        if missing:
            raise CheckpointError(f"{path}: tensor {short(missing[0])} is listed in the index under "
                                  f"{short(weight_map[missing[0]])} but that shard does not hold it"
                                  f"{f' ({len(missing)} such tensors)' if len(missing) > 1 else ''}.")
    except Exception:
        for shard in shards:
            shard.close()
        raise
    metadata = {clean_text(k): clean_text(str(v)) for k, v in index_metadata.items()}
    inner = shards[0].format if shards else "safetensors"
    return Checkpoint(path, f"sharded-{inner}", tensors, metadata, "", files)


FORMAT = register_format("sharded", _sniff, open_sharded)
