"""Run mergekit YAML configs as they are: translate one into a streammerge config.

mergekit resolves every parameter per tensor: a model's own `parameters` first, then the top-level ones; a
value is a scalar, a gradient (a list interpolated over the layers: t = layer / (layers - 1), t = 0 for tensors
outside the layers) or a list of `{filter, value}` conditions (the first whose filter is a substring of the
tensor name wins). We do the same for every tensor name (read from the checkpoint headers, no data), then
group the tensors by their resolved parameters: the most common set becomes the defaults, every other set a
rule. What streammerge cannot honour is refused by name, never ignored.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from streammerge.errors import ConfigError, short
from streammerge.hf import hub
from streammerge.layers import find_layer
from streammerge.methods.method import Method
from streammerge.methods.registry import did_you_mean, methods

MERGEKIT_KEYS = {"merge_method", "models", "slices", "modules", "base_model", "parameters", "dtype", "out_dtype",
                 "tokenizer_source", "tokenizer", "chat_template"}
STREAMMERGE_KEYS = {"output", "max_ram", "seed", "shard_size"}  # ours, allowed beside mergekit's keys
REFUSED = {
    "modules": "per-module merges (multimodal models) are not supported; merge each part separately",
}
HALF_DTYPES = {"bfloat16", "float16", "bf16", "fp16", "half"}


def is_mergekit_config(data: dict) -> bool:
    return isinstance(data, dict) and "merge_method" in data


MOE_KEYS = {"experts", "gate_mode", "experts_per_token", "shared_experts"}


def check_not_moe(data: dict, where: str) -> None:
    """mergekit-moe configs build a mixture-of-experts model, which is not a merge streammerge can run."""
    if isinstance(data, dict) and "merge_method" not in data and MOE_KEYS & set(data):
        raise ConfigError(
            f"{where}: this is a mergekit-moe config (base_model + experts + gate_mode, for `mergekit-moe`), which "
            "builds a mixture-of-experts model with a trained or prompted router; streammerge does not build MoE "
            "models. It runs mergekit-yaml configs (merge_method: linear, slerp, ties, ... with models or slices) "
            "and its own configs; see `streammerge merge --help`.")


def _model_path(ref, where: str) -> str:
    """A mergekit model reference as a local path: a path as it is, a Hub id (`org/name[@revision]`) from the
    local Hugging Face cache or downloaded; LoRA references are refused."""
    revision = None
    if isinstance(ref, dict):
        for key in ("lora", "override_architecture"):
            if ref.get(key):
                raise ConfigError(f"{where}: '{key}' is not supported: streammerge merges checkpoints as they are "
                                  "on disk (merge the LoRA into its model first).")
        ref = ref.get("model")
        if isinstance(ref, dict):
            revision = ref.get("revision")
            ref = ref.get("path")
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{where}: 'model' must be a path.")
    if "+" in ref and not Path(ref).exists():
        raise ConfigError(f"{where}: '{ref}' uses mergekit's 'model+lora' syntax, which is not supported: merge the "
                          "LoRA into its model first and give the merged directory.")
    return str(hub.resolve(ref, where, revision))


# -- parameter settings --------------------------------------------------------------------------------------
def evaluate(setting, name: str, t: float):
    """A mergekit parameter setting for one tensor: a value, or None when no filter matches."""
    if isinstance(setting, dict) and "value" in setting:
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
                return setting[int(t * (len(setting) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for condition in setting:
            if not isinstance(condition, dict) or "value" not in condition:
                raise ConfigError(f"parameter setting {short(setting)}: a list must hold either values (a gradient) "
                                  "or {filter, value} conditions.")
            pattern = condition.get("filter")
            if pattern is not None and not isinstance(pattern, str):
                raise ConfigError(f"parameter setting {short(setting)}: filter {short(pattern)} must be a string (a "
                                  "part of tensor names).")
            if pattern is None or pattern == "*" or (name and pattern in name):
                return evaluate(condition["value"], name, t)
        return None
    raise ConfigError(f"parameter setting {short(setting)} is neither a value, a gradient list nor filter conditions.")


def check_setting(setting, where: str) -> None:
    """Refuse a parameter setting `evaluate` could not use for some tensor, before any tensor is looked at."""
    if isinstance(setting, dict) and "value" in setting:
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return
    if isinstance(setting, list):
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            return
        for condition in setting:
            if not isinstance(condition, dict) or "value" not in condition or set(condition) - {"filter", "value"}:
                raise ConfigError(f"{where}: {short(setting)}: a list must hold either values (a gradient) or "
                                  "{filter, value} conditions.")
            pattern = condition.get("filter")
            if pattern is not None and not isinstance(pattern, str):
                raise ConfigError(f"{where}: filter {short(pattern)} must be a string (a part of tensor names).")
            check_setting(condition["value"], where)
        return
    raise ConfigError(f"{where}: {short(setting)} is neither a value, a gradient list nor filter conditions.")


def resolve(key: str, scopes: list[dict | None], name: str, t: float):
    for scope in scopes:
        if scope and key in scope:
            value = evaluate(scope[key], name, t)
            if value is not None:
                return value
    return None


def layer_positions(names: list[str]) -> dict[str, float]:
    """mergekit's t per tensor: layer / (layers - 1) inside the stack of layers, 0 outside it."""
    index = {n: layer[1] for n in names if (layer := find_layer(n)) is not None}
    count = max(index.values()) + 1 if index else 0
    return {n: (index[n] / (count - 1) if count > 1 else 1.0) if n in index else 0.0 for n in names}


# -- translation ---------------------------------------------------------------------------------------------
def _check_parameters(scope, method: Method, where: str, allow_method_params: bool, warnings: list[str]) -> dict:
    """The parameters streammerge uses from one scope. Those mergekit would ignore are dropped with a warning
    (a mergekit config that runs in mergekit runs here too); those it would use are kept."""
    if scope is None:
        return {}
    if not isinstance(scope, dict):
        raise ConfigError(f"{where}: 'parameters' must be a mapping.")
    used = {}
    for key, value in scope.items():
        param = method.param(key)
        if param is None:
            known = ", ".join(p.name for p in method.params) or "none"
            warnings.append(f"{where}: {short(key)} is ignored: it is not a parameter of method '{method.name}' "
                            f"(those are: {known}), and mergekit ignores it too.")
        elif not param.per_model and not allow_method_params:
            warnings.append(f"{where}: '{key}' is ignored: it is a parameter of the whole merge, which mergekit "
                            "reads only from the top-level 'parameters'; move it there to use it.")
        else:
            check_setting(value, f"{where}: {key}")
            used[key] = value
    return used


def _models_from_slices(data: dict, where: str) -> tuple[list, dict | None, int]:
    """A single slice whose sources all span the same full layer range is a plain merge of whole models."""
    slices = data["slices"]
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
        raise ConfigError(f"{where}: 'slices' with more than one slice (layer stacking, frankenmerges) is not "
                          "supported; streammerge merges whole models of one architecture.")
    the_slice = slices[0]
    unknown = set(the_slice) - {"sources", "parameters"}
    if unknown:
        raise ConfigError(f"{where}: slices[0]: '{sorted(unknown)[0]}' is not supported.")
    sources = the_slice.get("sources") or []
    if not isinstance(sources, list) or not all(isinstance(s, dict) for s in sources):
        raise ConfigError(f"{where}: slices[0].sources must be a list of {{model: PATH, layer_range: [0, N]}}.")
    for i, s in enumerate(sources):
        layer_range = s.get("layer_range")
        if (not isinstance(layer_range, list) or len(layer_range) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in layer_range)):
            raise ConfigError(f"{where}: slices[0].sources[{i}].layer_range must be [START, END], two whole numbers; "
                              f"got {short(layer_range)}.")
    ranges = {tuple(s["layer_range"]) for s in sources}
    if len(ranges) != 1 or len(next(iter(ranges))) != 2 or next(iter(ranges))[0] != 0:
        raise ConfigError(f"{where}: slices[0]: every source must have the same layer_range starting at 0 (a whole "
                          "model); other layer ranges are not supported.")
    models = [{"model": s.get("model"), "parameters": s.get("parameters")} for s in sources]
    return models, the_slice.get("parameters"), next(iter(ranges))[1]


def translate(data: dict, source: Path | None = None, warnings: list[str] | None = None) -> dict:
    """A mergekit config as a streammerge config dict (for config.parse_config); what mergekit would ignore is
    appended to `warnings`."""
    from streammerge.io import open_checkpoint

    where = f"{source}" if source else "mergekit config"
    warnings = [] if warnings is None else warnings
    for key in data:
        if key not in MERGEKIT_KEYS | STREAMMERGE_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}' in a mergekit config (streammerge also accepts "
                              f"{', '.join(sorted(STREAMMERGE_KEYS))}).")
        if key in REFUSED and data[key] is not None:
            raise ConfigError(f"{where}: '{key}' is not supported: {REFUSED[key]}.")
    name = data["merge_method"]
    if not isinstance(name, str):
        raise ConfigError(f"{where}: merge_method must be a method name, got {short(name)}.")
    available = [m.name for m in methods() if m.in_mergekit]
    if name not in available:
        raise ConfigError(f"{where}: mergekit merge_method {short(name)} is not available in streammerge"
                          f"{did_you_mean(name, available)}; available: {', '.join(available)}.")
    method = methods().get(name)
    slice_parameters, slice_layers = None, None
    if data.get("slices") is not None:
        if data.get("models") is not None:
            raise ConfigError(f"{where}: give either 'models' or 'slices', not both.")
        entries, slice_parameters, slice_layers = _models_from_slices(data, where)
    else:
        entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: 'models' must be a non-empty list of {{model: PATH, parameters: ...}}.")
    global_scope = _check_parameters(data.get("parameters"), method, f"{where}: parameters", True, warnings)
    slice_scope = _check_parameters(slice_parameters, method, f"{where}: slices[0].parameters", True,
                                    warnings)

    models = []  # (path, own parameters)
    for i, entry in enumerate(entries):
        entry = entry if isinstance(entry, dict) else {"model": entry}
        extra = set(entry) - {"model", "parameters", "layer_range"}
        if extra:
            raise ConfigError(f"{where}: models[{i}]: '{sorted(extra)[0]}' is not supported.")
        path = _model_path(entry.get("model"), f"{where}: models[{i}]")
        models.append((path, _check_parameters(entry.get("parameters"), method, f"{where}: models[{i}]", False,
                                                    warnings)))
    base = _model_path(data["base_model"], f"{where}: base_model") if data.get("base_model") else None

    # Which entries are merged, and which one is the base, the way mergekit's methods take them.
    same = (lambda a, b: Path(a).resolve() == Path(b).resolve())
    non_base = [(p, s) for p, s in models if base is None or not same(p, base)]
    if name == "slerp":
        if base is None:
            raise ConfigError(f"{where}: slerp needs 'base_model' (t = 0 gives the base model).")
        inputs, base_path = [(base, {})] + non_base, None
    elif method.uses_base:
        if method.needs_base and base is None:
            raise ConfigError(f"{where}: merge_method '{name}' needs 'base_model'.")
        inputs, base_path = non_base, base
    else:
        inputs, base_path = list(models), None
        if base is not None and not any(same(p, base) for p, _ in models):
            inputs.append((base, {}))  # mergekit merges a base_model missing from `models` as one more input

    if not inputs:
        raise ConfigError(f"{where}: 'models' lists no model besides base_model; nothing to merge.")
    first = open_checkpoint(Path(inputs[0][0]))  # headers only: the tensor names
    try:
        names = list(first.tensors)
    finally:
        first.close()
    positions = layer_positions(names)
    if slice_layers is not None:
        layers = len({layer[1] for n in names if (layer := find_layer(n)) is not None})
        if layers and slice_layers != layers:
            raise ConfigError(f"{where}: slices[0] spans layers [0, {slice_layers}) but the models have {layers} "
                              "layers; only whole models can be merged.")

    def resolved(tensor: str) -> tuple:
        t = positions[tensor]
        method_values = []
        for p in method.method_params:
            value = resolve(p.name, [slice_scope, global_scope], tensor, t)
            method_values.append(p.default if value is None else value)
        model_values = []
        for p in method.model_params:
            row = []
            for _, own in inputs:
                value = resolve(p.name, [own, slice_scope, global_scope], tensor, t)
                row.append(p.default if value is None else value)
            model_values.append(tuple(row))
        return tuple(method_values), tuple(model_values)

    groups: dict[tuple, list[str]] = {}
    for tensor in names:
        groups.setdefault(resolved(tensor), []).append(tensor)
    if not groups:
        groups[resolved("")] = []
    default = Counter({k: len(v) for k, v in groups.items()}).most_common(1)[0][0]

    def as_params(values: tuple) -> tuple[dict, list[dict]]:
        method_values, model_values = values
        top = {p.name: v for p, v in zip(method.method_params, method_values)}
        per_model = [{p.name: row[i] for p, row in zip(method.model_params, model_values)}
                     for i in range(len(inputs))]
        return top, per_model

    top, per_model = as_params(default)
    config = {
        "method": name,
        "models": [{"path": path, **params} for (path, _), params in zip(inputs, per_model)],
        "parameters": top,
        "rules": [],
    }
    for values, tensors in groups.items():
        if values == default:
            continue
        rule_top, rule_models = as_params(values)
        rule = {"match": "re:^(?:" + "|".join(re.escape(n) for n in tensors) + ")$", "parameters": dict(rule_top)}
        for p in method.model_params:
            rule["parameters"][p.name] = [m[p.name] for m in rule_models]
        config["rules"].append(rule)
    if base_path is not None:
        config["base"] = base_path
    dtype, out_dtype = data.get("dtype"), data.get("out_dtype")
    if dtype is not None:
        if not isinstance(dtype, str):
            raise ConfigError(f"{where}: dtype must be a dtype name such as bfloat16, got {short(dtype)}.")
        dtype = dtype.removeprefix("torch.")
        if dtype in HALF_DTYPES:  # accumulate in float32 (more precise), write what mergekit would
            out_dtype = out_dtype or dtype
            dtype = "float32"
        config["dtype"] = dtype
    if out_dtype is not None:
        config["out_dtype"] = out_dtype
    if data.get("tokenizer_source") is not None and data.get("tokenizer") is not None:
        raise ConfigError(f"{where}: give either 'tokenizer_source' or 'tokenizer', not both (as in mergekit).")
    tokenizer = data.get("tokenizer") if data.get("tokenizer") is not None else data.get("tokenizer_source")
    if tokenizer is not None:
        config["tokenizer"] = tokenizer
    if data.get("chat_template") is not None:
        config["chat_template"] = data["chat_template"]
    if base is not None:
        config["donor"] = base  # mergekit takes the output's config and tokenizer from base_model
    for key in STREAMMERGE_KEYS:
        if data.get(key) is not None:
            config[key] = data[key]
    return config
