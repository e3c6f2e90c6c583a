"""Where the weights sit inside a loaded checkpoint object, and a JSON view of everything else.

The weights are the mapping of names to tensors with the most tensor bytes, searched through nested dicts:
a bare state dict, `model`, `state_dict`, `model_state_dict`, `module`, `model.state_dict`, Lightning
`.ckpt` files (`state_dict` beside `optimizer_states` and `hyper_parameters`), fairseq
(`{"model": ..., "args": Namespace, "cfg": ...}`), Coqui trainer files (`model` beside `optimizer`,
`scaler`, `config`, ...). Optimizer, scheduler and scaler state (known by its key, or an optimizer's
`{"state", "param_groups"}` under any key) is never searched, never chosen and never merged; in the
metadata it is summarised, not dumped. `state_dict_key: a.b` in the config picks a mapping explicitly.
Tensors may be live `torch.Tensor`s (torch.load) or `TensorRecord`s (the restricted unpickler).

`Checkpoint.metadata` is `to_jsonable` of the rest of the file (see safe_pickle.py for the exact shape of
inert records); `plain_config` turns such a value back into plain dicts, lists and scalars.
"""

from __future__ import annotations

import datetime
import pathlib
from collections.abc import Mapping
from pathlib import Path

import torch

from streammerge.errors import CheckpointError, NoWeightsError, short
from streammerge.io.checkpoint import Checkpoint, clean_text
from streammerge.io.mapped import MappedFile
from streammerge.io.safe_pickle import InertObject, StorageType, TensorRecord, is_inert_class, tensor_infos

# Never merged, never searched for weights: training state that only looks like a state dict.
TRAINING_STATE_KEYS = {"optimizer", "optimizer_states", "optimizers", "optimizer_state_dict", "optim",
                       "scheduler", "lr_scheduler", "lr_schedulers", "scheduler_state_dict", "scaler",
                       "grad_scaler", "amp", "amp_scaler", "last_optimizer_state", "optimizer_state",
                       "scheduler_state"}
# What torch.optim.Optimizer.state_dict() holds, whatever key a training script stores it under.
OPTIMIZER_STATE_FIELDS = frozenset({"state", "param_groups"})
MARKERS = ("__class__", "__global__", "__args__", "__state__", "__items__", "__list__", "__summary__")
MAX_LISTED = 12
# Attributes that code sets on a config object besides its declared fields (so a pickled instance holds them but
# the class's to_dict() does not give them), for classes whose fields cannot be read without importing them.
NOT_FIELDS = {
    "TTS.tts.configs.xtts_config.XttsConfig": {"num_chars"},  # set by BaseTTS._set_model_args
}
# Bounds of the JSON view of a checkpoint's non-tensor content (its metadata), however the pickle is built.
MAX_METADATA_VALUES = 100_000
MAX_METADATA_CHARS = 16 * 1024**2
MAX_METADATA_DEPTH = 64
OMITTED = f"... (omitted: metadata beyond {MAX_METADATA_VALUES} values or {MAX_METADATA_CHARS} characters)"
MAX_ARRAY_ELEMENTS = 64


def is_training_state(key, value) -> bool:
    """Optimizer/scheduler/scaler state: known by its key, by the shape of an optimizer's state_dict(), or as
    the summary `to_jsonable` made of it in a checkpoint's metadata."""
    return key in TRAINING_STATE_KEYS or (
        isinstance(value, Mapping) and ("__summary__" in value or (
            set(value) == OPTIMIZER_STATE_FIELDS and isinstance(value["param_groups"], list))))


def is_tensor(value) -> bool:
    return isinstance(value, (torch.Tensor, TensorRecord))


def _storage_identity(value) -> tuple:
    """Equal for two tensors that are the same bytes (tied weights)."""
    if isinstance(value, TensorRecord):
        return (value.storage.key, value.offset, value.shape, value.stride, value.dtype)
    if value.numel() == 0:
        return (id(value),)
    return (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(),
            value.dtype)


def _tensor_items(node: Mapping) -> dict:
    return {k: v for k, v in node.items() if isinstance(k, str) and is_tensor(v)}


def _tensor_bytes(tensors) -> int:
    seen = {}
    for v in tensors:
        seen.setdefault(_storage_identity(v), v.nbytes)
    return sum(seen.values())


def _candidates(obj) -> list[tuple[list, Mapping, int]]:
    """(key path, mapping, tensor bytes) of every mapping holding named tensors, shallowest first."""
    found, seen = [], set()
    # Each node is (parent node, key, mapping): the key path is spelled out only for the mappings found, so
    # the search stays linear however deeply the mappings nest.
    level = [(None, None, obj)]
    while level:
        nxt = []
        for entry in level:
            node = entry[2]
            if not isinstance(node, Mapping) or id(node) in seen:
                continue
            seen.add(id(node))
            tensors = _tensor_items(node)
            if tensors:
                found.append((_key_path(entry), node, _tensor_bytes(tensors.values())))
            for k, v in node.items():
                if isinstance(k, str) and isinstance(v, Mapping) and not is_training_state(k, v):
                    nxt.append((entry, k, v))
        level = nxt
    return found


def _key_path(entry) -> list:
    parts = []
    while entry[0] is not None:
        parts.append(entry[1])
        entry = entry[0]
    return parts[::-1]


def _signature(node: Mapping) -> frozenset:
    return frozenset((k, _storage_identity(v)) for k, v in _tensor_items(node).items())


def find_state_dict(obj, path: Path, key: str | None = None) -> tuple[dict, str, object]:
    """(name -> tensor mapping, dotted key where it sits, the object without those tensors)."""
    if key:
        node, parts = resolve_key(obj, path, key)
        tensors = _tensor_items(node) if isinstance(node, Mapping) else {}
        if not tensors:
            raise CheckpointError(f"{path}: state_dict_key '{key}' holds no tensors (it is {describe(node)}). "
                                  f"Mappings of tensors in this file: {_list_candidates(obj)}.")
        return tensors, key, _without(obj, parts, set(tensors))
    candidates = _candidates(obj)
    if not candidates:
        raise NoWeightsError(f"{path}: no tensors found where weights are kept: the file holds {describe(obj)}"
                              f"{_training_only_hint(obj)}. Point `path` at a checkpoint of model weights, or set "
                              "`state_dict_key` if they sit somewhere unusual.")
    best = max(size for _, _, size in candidates)
    top = [c for c in candidates if c[2] == best]
    distinct = {}
    for parts, node, size in top:  # the same tensors reachable under two keys are one candidate
        distinct.setdefault(_signature(node), (".".join(parts), node, size))
    if len(distinct) > 1:
        listed = ", ".join(f"'{d or '(top level)'}' ({len(_tensor_items(n))} tensors, {s / 1e6:.1f} MB)"
                           for d, n, s in distinct.values())
        raise CheckpointError(f"{path}: several state dicts of equal size could be the weights: {listed}. Set "
                              "`state_dict_key` to the one to merge for this model in the config (e.g. "
                              f"state_dict_key: {next(iter(distinct.values()))[0] or '...'}).")
    parts, node, _ = top[0]
    tensors = _tensor_items(node)
    return tensors, ".".join(parts), _without(obj, parts, set(tensors))


def resolve_key(obj, path: Path, key: str) -> tuple[object, list[str]]:
    """Follow a dotted key through nested mappings; a key that itself contains dots is matched whole first."""
    node, parts, done = obj, key.split("."), []
    while parts:
        if not isinstance(node, Mapping):
            where = f"'{'.'.join(done)}'" if done else "the top level"
            raise CheckpointError(f"{path}: state_dict_key '{key}' does not exist: {where} is {describe(node)}, "
                                  "not a mapping.")
        for n in range(len(parts), 0, -1):
            part = ".".join(parts[:n])
            if part in node:
                node, parts = node[part], parts[n:]
                done.append(part)
                break
        else:
            where = f"'{'.'.join(done)}' holds" if done else "the top level holds"
            raise CheckpointError(f"{path}: state_dict_key '{key}' does not exist: {where} the keys "
                                  f"{_list_keys(node)}. Use one of those (dotted for nested keys).")
    return node, done


def _without(obj, parts: list[str], tensor_names: set):
    """`obj` with the chosen tensors removed (other entries of that mapping are kept)."""
    if not isinstance(obj, Mapping):
        return None
    if not parts:
        return {k: v for k, v in obj.items() if k not in tensor_names}
    head, *tail = parts
    out = {}
    for k, v in obj.items():
        if k == head:
            rest = _without(v, tail, tensor_names)
            if rest:
                out[k] = rest
            continue
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------------------------
# Describing what was found, for error messages

def describe(value) -> str:
    if isinstance(value, Mapping):
        return f"a mapping with keys {_list_keys(value)}"
    if isinstance(value, InertObject):
        return f"a pickled {value.class_name} object"
    if is_tensor(value):
        return f"a single tensor of shape {list(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def _type_name(value) -> str:
    if isinstance(value, InertObject):
        return value.class_name.rpartition(".")[2]
    if is_tensor(value):
        return "tensor"
    return type(value).__name__


def _list_keys(node: Mapping) -> str:
    keys = list(node)
    shown = ", ".join(f"{k!s} ({_type_name(node[k])})" for k in keys[:MAX_LISTED])
    more = f", ... ({len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
    return f"[{shown}{more}]" if keys else "[] (empty)"


def _list_candidates(obj) -> str:
    found = _candidates(obj)
    if not found:
        return "none"
    return ", ".join(f"'{'.'.join(p) or '(top level)'}' ({len(_tensor_items(n))} tensors)"
                     for p, n, _ in found[:MAX_LISTED])


def _training_only_hint(obj) -> str:
    if isinstance(obj, Mapping) and any(is_training_state(k, v) for k, v in obj.items()):
        return " (only optimizer/scheduler state holds tensors, and that is never merged)"
    if isinstance(obj, InertObject):
        return (" (a whole pickled object rather than a state dict: re-save it with "
                "torch.save(model.state_dict(), path))")
    return ""


# ---------------------------------------------------------------------------------------------------------------
# JSON views

def summarize_training_state(value) -> dict:
    """Optimizer/scheduler/scaler state in a few numbers instead of thousands of tensor descriptions."""
    count, tensors, groups, stack, seen = 0, [], [], [value], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if is_tensor(node):
            count += 1
            tensors.append(node)
        elif isinstance(node, Mapping):
            if isinstance(node.get("param_groups"), list):
                groups.extend(g for g in node["param_groups"] if isinstance(g, Mapping))
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif isinstance(node, InertObject):
            stack.extend([node.fields, node.items, node.listitems, node.args])
    out = {"__summary__": "training state (never merged)", "tensors": count, "tensor_bytes": _tensor_bytes(tensors)}
    if groups:
        out["param_groups"] = [to_jsonable({k: v for k, v in g.items() if k != "params"}) for g in groups]
    return out


class _Budget:
    """What is left of the size allowed for one JSON view (see MAX_METADATA_VALUES, MAX_METADATA_CHARS)."""

    __slots__ = ("values", "chars", "exhausted")

    def __init__(self):
        self.values, self.chars, self.exhausted = MAX_METADATA_VALUES, MAX_METADATA_CHARS, False

    def take(self, chars: int = 0) -> bool:
        self.values -= 1
        self.chars -= chars
        if self.values < 0 or self.chars < 0:
            self.exhausted = True
        return not self.exhausted


def to_jsonable(obj, depth: int = 0, _path: set | None = None, _budget: _Budget | None = None):
    """A JSON-safe view of non-tensor content; training state is summarised (see safe_pickle for records).

    The view is bounded however the pickle is built: a value shared by many references (a pickle memo bomb:
    40 levels of `[x, x]` in 2 KB, one long string referenced a thousand times) costs its size at every place
    it appears, and once MAX_METADATA_VALUES values or MAX_METADATA_CHARS characters have been produced the
    rest is replaced by OMITTED. Nesting beyond MAX_METADATA_DEPTH and cycles become null."""
    budget = _Budget() if _budget is None else _budget
    kind = type(obj)
    if not budget.take(len(obj) if isinstance(obj, str) else 0):
        return OMITTED
    # Plain values and containers first, by exact type: a bounded view of a memo bomb visits every one of its
    # MAX_METADATA_VALUES values, and none of the checks below can match them.
    if kind is str:
        return clean_text(obj)
    if kind is int:
        return obj if -2**63 <= obj < 2**64 else short(obj, 200)  # beyond any JSON reader's integers
    if obj is None or kind is bool or kind is float:
        return obj
    if kind not in (dict, list, tuple):
        special = _special_jsonable(obj, depth, _path, budget)
        if special is not _NOT_SPECIAL:
            return special
    path = set() if _path is None else _path
    if depth > MAX_METADATA_DEPTH or id(obj) in path:  # cycles (e.g. a config node pointing at its parent)
        return None
    path.add(id(obj))  # the containers above this one; removed on the way back up
    try:
        return _container_jsonable(obj, depth, path, budget)
    finally:
        path.discard(id(obj))


_NOT_SPECIAL = object()


def _special_jsonable(obj, depth: int, path: set | None, budget: _Budget):
    """The view of a value that is not a plain container: tensors, dtypes, dates, numpy values, scalar
    subclasses; _NOT_SPECIAL for containers (mappings, sequences, sets, inert records) and anything else."""
    if is_tensor(obj):
        return {"tensor": list(obj.shape), "dtype": str(obj.dtype).removeprefix("torch.")}
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, (datetime.date, datetime.time)):
        return obj.isoformat()
    if isinstance(obj, datetime.timedelta):
        return obj.total_seconds()
    if isinstance(obj, StorageType):
        return repr(obj)
    if is_inert_class(obj):
        return {"__global__": obj._global_name}
    numpy_view = _numpy_jsonable(obj, budget)
    if numpy_view is not None:
        return numpy_view
    if isinstance(obj, (bool, int, float, str)):  # subclasses: IntEnum members and the like
        return to_jsonable(_scalar(obj), depth, path, budget)
    return _NOT_SPECIAL


def _container_jsonable(obj, depth: int, path: set, budget: _Budget):
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if budget.exhausted:
                out["..."] = OMITTED
                break
            out[_key(k)] = (summarize_training_state(v) if is_training_state(k, v) and _has_tensors(v)
                            else to_jsonable(v, depth + 1, path, budget))
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        out = []
        for v in obj:
            if budget.exhausted:
                out.append(OMITTED)
                break
            out.append(to_jsonable(v, depth + 1, path, budget))
        return out
    if isinstance(obj, InertObject):
        return _inert_jsonable(obj, depth, path, budget)
    return short(obj, 200)


def _key(key) -> str:
    if type(key) is int and -10**18 < key < 10**18:
        return str(key)  # what short() gives such an int, without reprlib (memo bombs repeat their keys)
    return clean_text(key) if isinstance(key, str) else short(key, 200)


def _scalar(obj):
    """bool/int/float/str subclasses (numpy float64, enum members, ...) as their plain value."""
    for kind in (bool, int, float, str):
        if isinstance(obj, kind):
            return kind(obj)
    return obj


def _numpy_jsonable(obj, budget: _Budget):
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return None
    if isinstance(obj, np.generic):
        value = obj.item()
        return (to_jsonable(value, _budget=budget) if isinstance(value, (bool, int, float, str)) or value is None
                else short(value, 200))
    if isinstance(obj, np.dtype):
        return str(obj)
    if isinstance(obj, np.ndarray):
        if obj.size <= MAX_ARRAY_ELEMENTS and obj.dtype.kind in "biufcUS":
            return to_jsonable(obj.tolist(), _budget=budget)
        return {"__class__": "numpy.ndarray", "shape": list(obj.shape), "dtype": str(obj.dtype)}
    return None


def _has_tensors(value) -> bool:
    return summarize_training_state(value)["tensors"] > 0 if isinstance(value, (Mapping, list, tuple)) else False


def _inert_jsonable(obj: InertObject, depth: int, path: set, budget: _Budget) -> dict:
    name = obj.class_name
    if name.startswith("omegaconf."):
        content = obj.fields.get("_content") if "_content" in obj.fields else obj.fields.get("_val")
        if name.startswith("omegaconf.nodes."):
            return to_jsonable(content, depth + 1, path, budget)
        out = {"__class__": name}
        if isinstance(content, Mapping):
            out.update({_key(k): to_jsonable(v, depth + 1, path, budget) for k, v in content.items()})
        elif isinstance(content, (list, tuple)):
            out["__list__"] = [to_jsonable(v, depth + 1, path, budget) for v in content]
        elif content is not None:
            out["__state__"] = to_jsonable(content, depth + 1, path, budget)
        return out
    if name.startswith("pathlib.") and name.endswith("Path") and obj.args and not obj.fields \
            and all(isinstance(a, str) for a in obj.args):  # a path: its string (our own pure path, no I/O)
        pure = pathlib.PureWindowsPath if "Windows" in name else pathlib.PurePosixPath
        return str(pure(*obj.args))
    out = {"__class__": name}
    out.update({_key(k): to_jsonable(v, depth + 1, path, budget) for k, v in obj.fields.items()
                if _key(k) not in MARKERS})
    if obj.args or obj.kwargs:
        out["__args__"] = [to_jsonable(a, depth + 1, path, budget) for a in obj.args]
        if obj.kwargs:
            out["__args__"].append(to_jsonable(obj.kwargs, depth + 1, path, budget))
    if obj.state is not None:
        out["__state__"] = to_jsonable(obj.state, depth + 1, path, budget)
    if obj.items:
        out["__items__"] = to_jsonable(obj.items, depth + 1, path, budget)
    if obj.listitems:
        out["__list__"] = to_jsonable(obj.listitems, depth + 1, path, budget)
    return out


def plain_config(value):
    """A metadata value (e.g. a pickled XttsConfig record) as plain dicts, lists and scalars.

    Inert records lose their markers: their fields (and dict-subclass items) become a dict, as the class's own
    `to_dict()` would give them: attributes set outside the declared fields are left out (private ones,
    `_initialized` of Coqpit configs; those in NOT_FIELDS, e.g. the `num_chars` Coqui's model code sets on an
    XttsConfig); a record with
    no fields stands for its single constructor argument (enum members, paths, decimals), its argument list,
    its list items or its non-dict state; a global reference becomes its dotted name.
    """
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if kind is list or kind is tuple:
        return [plain_config(v) for v in value]
    if isinstance(value, Mapping):
        if "__global__" in value and len(value) == 1:
            return value["__global__"]
        if "__class__" in value or "__summary__" in value:
            leftovers = NOT_FIELDS.get(value.get("__class__"), ())
            fields = {k: plain_config(v) for k, v in value.items()
                      if k not in MARKERS and not (k.startswith("_") and "__class__" in value) and k not in leftovers}
            if "__items__" in value and isinstance(value["__items__"], Mapping):
                fields.update({k: plain_config(v) for k, v in value["__items__"].items()})
            if fields:
                return fields
            for marker in ("__list__", "__state__"):
                if marker in value:
                    return plain_config(value[marker])
            args = value.get("__args__")
            if isinstance(args, list):
                return plain_config(args[0]) if len(args) == 1 else plain_config(args)
            return {}
        return {k: plain_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_config(v) for v in value]
    if isinstance(value, (InertObject, torch.Tensor, TensorRecord)) or not _is_json_scalar(value):
        return plain_config(to_jsonable(value))
    return value


def _is_json_scalar(value) -> bool:
    return value is None or type(value) in (bool, int, float, str)


def checkpoint_from_pickle(path: Path, fmt: str, obj, storage_offsets: dict[str, int],
                           state_dict_key: str | None) -> Checkpoint:
    """A Checkpoint from a restricted-unpickled object whose storages sit at known offsets in `path`."""
    state_dict, container, rest = find_state_dict(obj, path, state_dict_key)
    mapped = MappedFile(path)
    try:
        tensors = tensor_infos(path, state_dict, storage_offsets, mapped)
    except Exception:
        mapped.close()
        raise
    return Checkpoint(path, fmt, tensors, to_jsonable(rest), container, [mapped])
