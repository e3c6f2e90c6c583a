"""Where the weights sit inside a loaded checkpoint object, and a JSON view of everything else."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from streammerge.errors import CheckpointError

# Never merged, never searched for weights: training state that only looks like a state dict.
TRAINING_STATE_KEYS = {"optimizer", "optimizer_states", "optimizers", "scheduler", "lr_scheduler", "lr_schedulers",
                       "scaler", "grad_scaler", "amp"}


def _tensor_items(node: Mapping) -> dict:
    return {k: v for k, v in node.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def find_state_dict(obj, path: Path, key: str | None = None) -> tuple[dict, str, object]:
    """(name -> tensor mapping, dotted key where it sits, the object without it)."""
    if key:
        node = obj
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                found = sorted(map(str, node)) if isinstance(node, Mapping) else type(node).__name__
                raise CheckpointError(f"{path}: state_dict_key '{key}' does not exist (at '{part}' found {found}).")
            node = node[part]
        if not isinstance(node, Mapping) or not _tensor_items(node):
            raise CheckpointError(f"{path}: state_dict_key '{key}' holds no tensors.")
        return _tensor_items(node), key, _without(obj, key.split("."))
    if isinstance(obj, Mapping):
        if isinstance(obj.get("model"), Mapping) and _tensor_items(obj["model"]):
            return _tensor_items(obj["model"]), "model", _without(obj, ["model"])
        tensors = _tensor_items(obj)
        if tensors:
            return tensors, "", {k: v for k, v in obj.items() if k not in tensors}
    raise CheckpointError(f"{path}: no tensors found at the top level or under 'model'.")


def _without(obj, parts: list[str]):
    if not isinstance(obj, Mapping):
        return None
    head, *tail = parts
    out = {}
    for k, v in obj.items():
        if k == head:
            if tail:
                out[k] = _without(v, tail)
            continue
        out[k] = v
    return out


def to_jsonable(obj, depth: int = 0):
    """A JSON-safe summary of non-tensor content (tensors become shape descriptions)."""
    if isinstance(obj, torch.Tensor):
        return {"tensor": list(obj.shape), "dtype": str(obj.dtype).removeprefix("torch.")}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if depth > 32:
        return repr(obj)[:200]
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, depth + 1) for v in obj]
    return repr(obj)[:200]
