"""Hugging Face sharded checkpoints: `*.index.json` = {"metadata": {...}, "weight_map": {name: shard file}}."""

from __future__ import annotations

import json
from pathlib import Path

from streammerge.errors import CheckpointError
from streammerge.io.checkpoint import Checkpoint, open_checkpoint, register_format


def _sniff(head: bytes, path: Path) -> bool:
    return path.name.endswith(".json") and head.lstrip()[:1] == b"{"


def open_sharded(path: Path, **options) -> Checkpoint:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable shard index ({exc}).") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: a shard index needs a non-empty 'weight_map' of tensor name -> shard file.")
    shard_names = sorted(set(weight_map.values()))
    shards = []
    try:
        for name in shard_names:
            shard_path = path.parent / name
            if not isinstance(name, str) or not shard_path.is_file():
                raise CheckpointError(f"{path}: the index lists shard '{name}', which does not exist next to it. "
                                      "Download the missing shard or fix the index.")
            shard = open_checkpoint(shard_path, **options)
            if shard.format == "sharded":
                raise CheckpointError(f"{path}: shard '{name}' is itself an index.")
            shards.append(shard)
        tensors, files = {}, []
        for name, shard in zip(shard_names, shards):
            files.extend(shard.files)
            for tensor_name, info in shard.tensors.items():
                if weight_map.get(tensor_name) == name:
                    tensors[tensor_name] = info
        missing = [n for n in weight_map if n not in tensors]
        if missing:
            raise CheckpointError(f"{path}: tensor '{missing[0]}' is listed in the index under "
                                  f"'{weight_map[missing[0]]}' but that shard does not hold it"
                                  f"{f' ({len(missing)} such tensors)' if len(missing) > 1 else ''}.")
    except Exception:
        for shard in shards:
            shard.close()
        raise
    metadata = {k: str(v) for k, v in (index.get("metadata") or {}).items()}
    inner = shards[0].format if shards else "safetensors"
    return Checkpoint(path, f"sharded-{inner}", tensors, metadata, "", files)


register_format("sharded", _sniff, open_sharded)
