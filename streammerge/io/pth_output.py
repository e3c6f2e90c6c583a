"""`.pth`/`.pt` output: a torch checkpoint that `torch.load(weights_only=True)` and Coqui's loader read, written
chunk by chunk like every other output (the merged state dict never sits in memory).

What the file holds follows the inputs. Plain state dicts in give a plain state dict out. Inputs that carry
training metadata (Coqui trainer checkpoints, the official XTTS-v2 `model.pth`) give what the classic
load-everything merge script wrote:

    {"model": merged state dict, "config": the first model's config (a plain dict),
     "step": max, "epoch": max, "model_loss": {"train_loss": sum w_i*l_i, "eval_loss": sum w_i*l_i}}

with w_i the models' `weight`s normalized to sum 1. Keys no input has are left out; optimizer, scheduler and
scaler state are dropped. That is `pth_container: auto`; `coqui` always writes `{"model": ...}` beside the
summary (what Coqui's loader reads, also from bare state dicts), `plain` the state dict alone (LAYOUTS). Tied tensors (several names, one storage) are saved as one storage under every name,
as `torch.save` does.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from collections import OrderedDict

import torch

from streammerge.errors import short
from streammerge.io.containers import MAX_METADATA_DEPTH, plain_config, to_jsonable
from streammerge.io.output_spec import PTH_CONTAINERS, OutputFile, OutputSpec, TensorPlacement, TorchContainer
from streammerge.io.single_file_output import SingleFileOutput
from streammerge.io.torch_zip_writer import TorchZipWriter

# dtypes torch.save pickles with a typed storage class and `_rebuild_tensor_v2`; newer dtypes go through
# UntypedStorage and `_rebuild_tensor_v3` (the same split torch.save makes).
LEGACY_STORAGE_TYPES = {
    torch.float64: "DoubleStorage", torch.float32: "FloatStorage", torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage", torch.int64: "LongStorage", torch.int32: "IntStorage",
    torch.int16: "ShortStorage", torch.int8: "CharStorage", torch.uint8: "ByteStorage", torch.bool: "BoolStorage",
    torch.complex128: "ComplexDoubleStorage", torch.complex64: "ComplexFloatStorage",
}
SUMMARY_KEYS = ("config", "step", "epoch", "model_loss")


class StorageRef:
    """One `data/<key>` record; pickled as torch's persistent id for a storage."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def persistent_id(self) -> tuple:
        if self.dtype in LEGACY_STORAGE_TYPES:
            return ("storage", getattr(torch, LEGACY_STORAGE_TYPES[self.dtype]), self.key, "cpu", self.numel)
        return ("storage", torch.UntypedStorage, self.key, "cpu", self.nbytes)


def contiguous_stride(shape: tuple) -> tuple:
    stride, step = [], 1
    for dim in reversed(shape):
        stride.append(step)
        step *= max(dim, 1)
    return tuple(reversed(stride))


class TensorRef:
    """A contiguous tensor over a whole storage; pickles exactly as torch.save pickles a tensor."""

    def __init__(self, storage: StorageRef, shape: tuple):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce_ex__(self, protocol):
        args = (self.storage, 0, self.shape, contiguous_stride(self.shape), False, OrderedDict())
        if self.storage.dtype in LEGACY_STORAGE_TYPES:
            return torch._utils._rebuild_tensor_v2, args
        return torch._utils._rebuild_tensor_v3, args + (self.storage.dtype,)


class _CheckpointPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.persistent_id() if isinstance(obj, StorageRef) else None


def pickle_checkpoint(obj) -> bytes:
    """The `data.pkl` torch.save would write for `obj`, whose tensors are `TensorRef`s."""
    buffer = io.BytesIO()
    _CheckpointPickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


# -- what goes next to the weights ---------------------------------------------------------------------------
def metadata_value(value):
    """A metadata value as data: safetensors metadata holds JSON text, torch containers hold the data itself.
    Parsed text gets the bounds of every checkpoint's metadata view (`containers.to_jsonable`: nesting beyond
    MAX_METADATA_DEPTH becomes null, integers beyond 64 bits become text, the total is capped), so what goes
    into the .pth pickle is bounded however the text was written; text that is not JSON, or nests too deeply
    for the parser, stays text."""
    if isinstance(value, str):
        try:
            return to_jsonable(json.loads(value))
        except (ValueError, RecursionError):  # RecursionError: thousands of nested brackets
            return value
    return value


def config_dict(value) -> dict | None:
    """The config as a plain dict (what Coqui's weights_only loader accepts; a pickled XttsConfig becomes its
    fields), or None when there is none."""
    value = plain_config(metadata_value(value))
    return value if isinstance(value, dict) else None


def _is_number(value) -> bool:
    """A finite number that a float holds (what step, epoch and losses are; the weighted loss is a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def weighted_loss(losses: list, weights: list[float]):
    """sum w_i * l_i over the inputs, for a number or for each key of a dict of numbers; None unless every
    input reports it."""
    if losses and all(_is_number(loss) for loss in losses):
        return float(sum(w * float(loss) for w, loss in zip(weights, losses)))
    if losses and all(isinstance(loss, dict) for loss in losses):
        out = {key: float(sum(w * float(loss[key]) for w, loss in zip(weights, losses)))
               for key in losses[0] if all(_is_number(loss.get(key)) for loss in losses)}
        return out or None
    return None


def training_summary(metadatas: list[dict], weights: list[float]) -> tuple[dict, list[str]]:
    """config (first model that has one), step and epoch (max), model_loss (weighted), each only if present;
    and a note for each value an input has that cannot be kept (the user should know it was left out)."""
    raw = {key: [m.get(key) for m in metadatas] for key in SUMMARY_KEYS}
    values = {key: [metadata_value(v) for v in raw[key]] for key in SUMMARY_KEYS}
    summary, notes = {}, []
    configs = [config_dict(v) for v in values["config"]]
    for i, (given, config) in enumerate(zip(raw["config"], configs)):
        if given is not None and config is None:
            notes.append(f"models[{i}]'s config ({short(given, 60)}) is not a mapping of at most "
                         f"{MAX_METADATA_DEPTH} levels; it is not used as the output's config.")
    config = next((c for c in configs if c is not None), None)
    if config is not None:
        summary["config"] = config
    for key in ("step", "epoch"):
        for i, (given, value) in enumerate(zip(raw[key], values[key])):
            if given is not None and not _is_number(value):
                notes.append(f"models[{i}]'s {key} ({short(given, 60)}) is not a finite number (integers beyond "
                             f"64 bits are not kept); left out of the output's {key}.")
        numbers = [v for v in values[key] if _is_number(v)]
        if numbers:
            summary[key] = max(numbers)
    loss = weighted_loss(values["model_loss"], weights)
    if loss is not None:
        summary["model_loss"] = loss
    return summary, notes


def normalized_model_weights(weights: tuple) -> list[float]:
    weights = list(weights)
    if not all(_is_number(w) for w in weights) or sum(weights) <= 0:
        weights = [1.0] * len(weights)
    total = sum(weights)
    return [w / total for w in weights]


# Each layout names where the state dict goes (a dotted key; "" for a bare state dict, which then holds nothing
# else) given the inputs' container key and the metadata summary.
LAYOUTS = {
    # like the inputs: bare from bare state dicts without metadata, else under the inputs' key (`model` when
    # only some inputs carry metadata)
    "auto": lambda key, summary: key or ("model" if summary else ""),
    "coqui": lambda key, summary: "model",  # what Coqui's load_checkpoint reads, whatever the inputs
    "plain": lambda key, summary: "",  # model.load_state_dict(torch.load(path)); metadata left out
}
assert set(LAYOUTS) == set(PTH_CONTAINERS)


def checkpoint_object(state_dict: dict, container: TorchContainer) -> tuple[object, list[str]]:
    """The object to save, laid out as `container.layout` says, and notes for the summary: the layout written
    and any input metadata that could not be kept."""
    metadatas = [m or {} for m in container.model_metadata]
    summary, notes = training_summary(metadatas, normalized_model_weights(container.model_weights))
    key = LAYOUTS[container.layout](container.key, summary)
    if not key:
        if summary:
            notes.append(f"pth_container: {container.layout} leaves out the inputs' {', '.join(summary)}.")
        hint = ("; `pth_container: coqui` wraps it as {'model': ...}, as Coqui's loader wants"
                if container.layout == "auto" else "")
        return state_dict, [f"the .pth holds a bare state dict (pth_container: {container.layout}{hint})."] + notes
    node = state_dict
    for part in reversed(key.split(".")):
        node = {part: node}
    listed = ", ".join([f"'{key}': state dict"] + [f"'{k}'" for k in summary])
    return {**node, **summary}, [f"the .pth holds {{{listed}}} (pth_container: {container.layout})."] + notes


# -- the output kind -----------------------------------------------------------------------------------------
def torch_checkpoint_writer(spec: OutputSpec) -> tuple[TorchZipWriter, dict[str, int], list[str]]:
    """The writer of `spec`'s .pth file, the index of the storage record each tensor is written to, and notes
    on what the file holds."""
    storage_of: dict[str, StorageRef] = {}
    storages: list[StorageRef] = []
    state_dict = {}
    tensors: dict[str, TensorRef] = {}
    for name, dtype, shape in spec.entries:
        source = spec.aliases.get(name)
        if source in tensors:  # share the storage, as torch.save does for tied parameters
            tensors[name] = tensors[source]
        else:
            storage = StorageRef(str(len(storages)), dtype, math.prod(shape))
            storages.append(storage)
            tensors[name] = TensorRef(storage, shape)
        storage_of[name] = tensors[name].storage
        state_dict[name] = tensors[name]
    obj, notes = checkpoint_object(state_dict, spec.container)
    writer = TorchZipWriter(spec.path, pickle_checkpoint(obj), [s.nbytes for s in storages])
    return writer, {name: int(storage.key) for name, storage in storage_of.items()}, notes


def torch_checkpoint_layout(spec: OutputSpec):
    writer, storage_of, _ = torch_checkpoint_writer(spec)
    placements = {name: TensorPlacement(0, writer.storages[i].data_offset, writer.storages[i].size)
                  for name, i in storage_of.items()}
    return (OutputFile(writer.path, writer.tmp_path, writer.total_size),), placements


class TorchCheckpointOutput(SingleFileOutput):
    keeps_checksums = True

    def __init__(self, spec: OutputSpec, resume: bool = False):
        writer, self.storage_of, notes = torch_checkpoint_writer(spec)
        super().__init__(spec, writer, resume)
        self.notes.extend(notes)

    def write(self, name: str, element_offset: int, chunk: torch.Tensor) -> None:
        if chunk.numel() == 0:
            return
        data = chunk.reshape(-1).contiguous().view(torch.uint8).numpy()
        self.writer.write(self.storage_of[name], element_offset * chunk.element_size(), data)

    def record_checksum(self, name: str, crc: int) -> None:
        self.writer.record_crc(self.storage_of[name], crc)

    def copy(self, source: str, target: str, chunk_bytes: int) -> None:
        src, dst = self.storage_of[source], self.storage_of[target]
        if src != dst:
            self.writer.copy(src, dst, chunk_bytes)
