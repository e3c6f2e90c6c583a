"""PEFT LoRA adapters applied while streaming (`MODEL+ADAPTER`).

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` as `peft` saves them: for each
targeted module `base_model.model.<module>.lora_A.weight` (r x in) and `.lora_B.weight` (out x r), or
`.lora_embedding_A` (r x num_embeddings) and `.lora_embedding_B` (dim x r) for an embedding, plus whole tensors
the adapter replaces (`modules_to_save`, saved embeddings: `<module>.weight`, `<module>.base_layer.weight`).
The merged weight is W + scale * B @ A (transposed for embeddings and `fan_in_fan_out` layers), scale =
lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`, alpha and r per module from `alpha_pattern` and
`rank_pattern` as peft matches them.

The update is never materialised: a chunk of W (a flat element range, i.e. some rows, the first and last
possibly partial) gets the product of the matching rows of the left factor with column blocks of the right
factor, computed in a chunk-sized scratch buffer. The factors stay in the mapped adapter file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from streammerge.errors import CheckpointError
from streammerge.io import Checkpoint, TensorInfo, open_checkpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
FACTORS = {".lora_A.weight": ("linear", "A"), ".lora_B.weight": ("linear", "B"),
           ".lora_embedding_A": ("embedding", "A"), ".lora_embedding_B": ("embedding", "B")}
UNSUPPORTED = {".lora_magnitude_vector": "DoRA (use_dora)", ".lora_B.bias": "LoRA biases (lora_bias)"}
WRAPPER_PARTS = (".base_layer.", ".modules_to_save.", ".original_module.")


def pattern_key(patterns, module: str) -> str | None:
    """The first `rank_pattern` / `alpha_pattern` key that matches the module, as peft matches them."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class LowRankDelta:
    """scale * left @ right for a 2-D tensor of `rows` x `cols`; `left` (rows x r) and `right` (r x cols) are
    (possibly transposed) views of the adapter's mapped factors."""

    left: torch.Tensor
    right: torch.Tensor
    scale: float
    source: str  # the adapter file, for messages

    @property
    def rank(self) -> int:
        return self.right.shape[0]

    def add_to(self, out: torch.Tensor, start: int, stop: int, scratch: torch.Tensor) -> None:
        """out[:] += elements [start, stop) of the flattened update; `scratch` (a chunk-sized buffer of out's
        dtype, more than `rank` elements) bounds every temporary."""
        cols = self.right.shape[1]
        rank = self.rank
        first_row = start // cols
        last_row = (stop - 1) // cols + 1
        left = self.left[first_row:last_row].to(out.dtype) * self.scale  # rows x r: small
        pos = start
        while pos < stop:
            row, c0 = divmod(pos, cols)
            full = min((stop - pos) // cols, scratch.numel() - rank) if c0 == 0 else 0  # whole rows that fit
            n, c1 = (full, cols) if full else (1, min(cols, c0 + stop - pos))
            target = out[pos - start:pos - start + n * (c1 - c0)].view(n, c1 - c0)
            rows = left[row - first_row:row - first_row + n]
            width = max(1, min(c1 - c0, scratch.numel() // (n + rank)))
            for c in range(c0, c1, width):
                w = min(width, c1 - c)
                right = scratch[:rank * w].view(rank, w).copy_(self.right[:, c:c + w])
                product = scratch[rank * w:rank * w + n * w].view(n, w)
                torch.mm(rows, right, out=product)
                target[:, c - c0:c - c0 + w].add_(product)
            pos += n * (c1 - c0)


def read_adapter_config(directory: Path) -> dict:
    path = Path(directory) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the LoRA adapter's config ({exc.strerror}); a PEFT adapter "
                              f"directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}.") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}).") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointError(f"{path}: not a LoRA adapter (peft_type {config.get('peft_type')!r}); only LoRA "
                              "adapters can be applied.")
    for key, what in (("use_dora", "DoRA"), ("layer_replication", "layer replication")):
        if config.get(key):
            raise CheckpointError(f"{path}: {what} ('{key}') is not supported; merge this adapter with peft "
                                  "(merge_and_unload) and give the merged model instead.")
    return config


def apply_adapter(checkpoint: Checkpoint, directory: Path) -> None:
    """Make `checkpoint` read as the model with the adapter merged in: targeted tensors carry their low-rank
    update, replaced tensors point into the adapter file."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{directory}: no {ADAPTER_WEIGHTS} (adapters saved as .bin are not read; re-save "
                              "with safe_serialization=True).")
    adapter = open_checkpoint(weights)
    checkpoint.files.extend(adapter.files)  # closed with the model
    factors: dict[str, dict[str, TensorInfo]] = {}
    kinds: dict[str, str] = {}
    for key, info in adapter.tensors.items():
        name = key.removeprefix(PREFIX)
        problem = next((what for suffix, what in UNSUPPORTED.items() if name.endswith(suffix)), None)
        if problem:
            raise CheckpointError(f"{weights}: '{key}' belongs to {problem}, which is not supported; merge this "
                                  "adapter with peft (merge_and_unload) and give the merged model instead.")
        factor = next(((suffix, kind) for suffix, kind in FACTORS.items() if name.endswith(suffix)), None)
        if factor is not None:
            module = name[:-len(factor[0])]
            factors.setdefault(module, {})[factor[1][1]] = info
            kinds[module] = factor[1][0]
            continue
        for part in WRAPPER_PARTS:
            name = name.replace(part, ".")
        target = checkpoint.tensors.get(name)
        if target is None:
            raise CheckpointError(f"{weights}: the adapter replaces '{name}', which {checkpoint.path} does not "
                                  "have. Use the adapter with the model it was trained on.")
        checkpoint.tensors[name] = dataclasses.replace(info, name=name)
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    for module, pair in factors.items():
        name = f"{module}.weight"
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{weights}: module '{module}' has lora_{''.join(pair)} but not its partner.")
        target = checkpoint.tensors.get(name)
        if target is None:
            raise CheckpointError(f"{weights}: the adapter targets '{name}', which {checkpoint.path} does not have. "
                                  "Use the adapter with the model it was trained on.")
        a, b = (pair[k].read().view(pair[k].shape) for k in ("A", "B"))
        if a.dim() != 2 or b.dim() != 2:
            raise CheckpointError(f"{weights}: '{module}' is not a linear or embedding LoRA (factors of shapes "
                                  f"{list(a.shape)}, {list(b.shape)}); only those can be applied.")
        transposed = kinds[module] == "embedding" or fan_in_fan_out
        left, right = (a.t(), b.t()) if transposed else (b, a)
        if len(target.shape) != 2 or (left.shape[0], right.shape[1]) != tuple(target.shape):
            raise CheckpointError(f"{weights}: the update of '{name}' is {left.shape[0]} x {right.shape[1]} but the "
                                  f"model's tensor is {list(target.shape)}. Use the adapter with the model it was "
                                  "trained on.")
        r = a.shape[0]
        alpha_key = pattern_key(config.get("alpha_pattern") or {}, module)
        alpha = float((config.get("alpha_pattern") or {})[alpha_key] if alpha_key else config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        checkpoint.tensors[name] = dataclasses.replace(target, delta=LowRankDelta(left, right, scale, str(weights)))
