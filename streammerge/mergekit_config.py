"""Run mergekit YAML configs as they are: translate one into a streammerge config.

mergekit resolves every parameter per tensor: a model's own `parameters` first, then the top-level ones; a
value is a scalar, a gradient (a list interpolated over the layers: t = layer / (layers - 1), t = 0 for tensors
outside the layers) or a list of `{filter, value}` conditions (the first whose filter is a substring of the
tensor name wins). We do the same for every tensor name (read from the checkpoint headers, no data), then
group the tensors by their resolved parameters: the most common set becomes the defaults, every other set a
rule. What streammerge cannot honour is refused by name; a parameter mergekit itself would ignore is ignored
with a warning that says so.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from streammerge.errors import ConfigError, PlanError, short
from streammerge.hf import hub
from streammerge.layers import split_layer_name
from streammerge.methods.method import Method
from streammerge.methods.registry import did_you_mean, methods
from streammerge.slices import Slice, SliceSource, place

MERGEKIT_KEYS = {"merge_method", "models", "slices", "modules", "base_model", "parameters", "dtype", "out_dtype",
                 "tokenizer_source", "tokenizer", "chat_template"}
# ours, allowed beside mergekit's keys
STREAMMERGE_KEYS = {"output", "max_ram", "seed", "shard_size", "pth_container", "workers", "ray"}
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
    """A mergekit model reference as a local path (`MODEL+ADAPTER` for a LoRA): a path as it is, a Hub id
    (`org/name[@revision]`) from the local Hugging Face cache or downloaded."""
    lora, revision = None, None
    if isinstance(ref, dict):
        if ref.get("override_architecture"):
            raise ConfigError(f"{where}: 'override_architecture' is not supported.")
        lora = ref.get("lora")
        lora = lora.get("path") if isinstance(lora, dict) else lora
        ref = ref.get("model")
        if isinstance(ref, dict):
            revision = ref.get("revision")
            ref = ref.get("path")
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{where}: 'model' must be a path.")
    if lora is None and "+" in ref and not Path(ref).exists():
        ref, lora = ref.split("+", 1)
    ref = str(hub.resolve(ref, where, revision))
    if lora is not None:
        lora = str(hub.resolve(str(lora), f"{where} (LoRA adapter)"))
    return f"{ref}+{lora}" if lora is not None else ref


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
    index = {n: parts[1] for n in names if (parts := split_layer_name(n))}
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


def _split(ref: str) -> tuple[str, str]:
    """(model path, adapter path or "") of a reference `_model_path` returned."""
    return (ref, "") if Path(ref).exists() else tuple(ref.split("+", 1))


def _same(a: str, b: str) -> bool:
    (model_a, lora_a), (model_b, lora_b) = _split(a), _split(b)
    return Path(model_a).resolve() == Path(model_b).resolve() and lora_a == lora_b


def _translate_slices(data: dict, method: Method, global_scope: dict, where: str, warnings: list[str]) -> dict:
    """mergekit `slices` as streammerge slices, with every tensor's parameters resolved as mergekit resolves
    them (gradients over the slice's layers, per-source values read with the source's own tensor name)."""
    from streammerge.io import open_checkpoint

    name = method.name
    base = _model_path(data["base_model"], f"{where}: base_model") if data.get("base_model") else None
    items = data["slices"]
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise ConfigError(f"{where}: 'slices' must be a non-empty list of {{sources: [...]}}.")
    paths: list[str] = []

    def index_of(path: str) -> int:
        for i, known in enumerate(paths):
            if _same(known, path):
                return i
        paths.append(path)
        return len(paths) - 1

    slices, scopes = [], []  # native slices; (slice scope, [own scope per source]) per slice
    for i, item in enumerate(items):
        at = f"{where}: slices[{i}]"
        unknown = set(item) - {"sources", "parameters", "base_model"}
        if unknown:
            raise ConfigError(f"{at}: '{sorted(unknown)[0]}' is not supported.")
        if item.get("base_model") and (base is None or not _same(
                _model_path(item["base_model"], f"{at}.base_model"), base)):
            raise ConfigError(f"{at}: a per-slice base_model other than the top-level base_model is not supported.")
        sources = item.get("sources")
        if not isinstance(sources, list) or not sources:
            raise ConfigError(f"{at}: 'sources' must be a non-empty list of {{model, layer_range}}.")
        parsed = []
        for j, src in enumerate(sources):
            sat = f"{at}.sources[{j}]"
            if not isinstance(src, dict) or set(src) - {"model", "layer_range", "parameters"}:
                raise ConfigError(f"{sat}: must be {{model, layer_range, parameters}}.")
            rng = src.get("layer_range")
            if (not isinstance(rng, list) or len(rng) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in rng) or not 0 <= rng[0] < rng[1]):
                raise ConfigError(f"{sat}: layer_range must be [START, STOP] (STOP exclusive), got {short(rng)}.")
            parsed.append((_model_path(src.get("model"), sat), rng,
                           _check_parameters(src.get("parameters"), method, sat, False, warnings)))
        base_src = next((s for s in parsed if base is not None and _same(s[0], base)), None)
        if name == "slerp":
            if base_src is None:
                raise ConfigError(f"{at}: slerp needs base_model among the slice's sources (t = 0 gives it).")
            inputs, base_range = [base_src] + [s for s in parsed if s is not base_src], None
        elif method.uses_base and base is not None:
            if base_src is None:
                raise ConfigError(f"{at}: base_model must be one of the slice's sources: mergekit takes the base "
                                  "model's layers from its layer_range there.")
            inputs, base_range = [s for s in parsed if s is not base_src], base_src[1]
        else:
            if method.needs_base:
                raise ConfigError(f"{where}: merge_method '{name}' needs 'base_model'.")
            inputs, base_range = parsed, None
        if not inputs:
            raise ConfigError(f"{at}: lists no source besides base_model; nothing to merge.")
        slices.append({"sources": [{"model": index_of(p), "layer_range": list(r)} for p, r, _ in inputs],
                       **({"base_layer_range": list(base_range)} if base_range else {})})
        scopes.append((_check_parameters(item.get("parameters"), method, f"{at}.parameters", True, warnings),
                       [own for _, _, own in inputs]))

    names = {}
    for i, path in enumerate(paths):
        checkpoint = open_checkpoint(Path(_split(path)[0]))  # headers only: the tensor names
        try:
            names[i] = list(checkpoint.tensors)
        finally:
            checkpoint.close()
    shapes = [Slice(tuple(SliceSource(s["model"], tuple(s["layer_range"]), {}) for s in piece["sources"]))
              for piece in slices]
    try:
        placements = place(shapes, names.__getitem__, lambda i: paths[i])
    except PlanError as exc:
        raise ConfigError(f"{where}: {exc}") from None

    # Each tensor's resolved values; the most common method values become the defaults, and each slice's most
    # common per-source values its sources' own: only the tensors that differ need a rule.
    resolved = []
    for p in placements:
        slice_scope, owns = scopes[p.slice_index]
        method_values = tuple(_value(resolve(q.name, [slice_scope, global_scope], p.name, p.t), q)
                              for q in method.method_params)
        model_values = tuple(tuple(_value(resolve(q.name, [own, slice_scope, global_scope], input_name, p.t), q)
                                   for own, input_name in zip(owns, p.inputs))
                             for q in method.model_params)
        resolved.append((p, method_values, model_values))
    default = Counter(m for _, m, _ in resolved).most_common(1)[0][0]
    for index, piece in enumerate(slices):
        full = [v for p, _, v in resolved if p.slice_index == index and len(p.inputs) == len(piece["sources"])]
        if full:
            own = Counter(full).most_common(1)[0][0]
            for j, source in enumerate(piece["sources"]):
                source.update({q.name: row[j] for q, row in zip(method.model_params, own)})
    groups: dict[tuple, list[str]] = {}
    for p, method_values, model_values in resolved:
        sources = slices[p.slice_index]["sources"][:len(p.inputs)]
        own = tuple(tuple(s.get(q.name, q.default) for s in sources) for q in method.model_params)
        if method_values != default or model_values != own:
            groups.setdefault((p.slice_index, len(p.inputs), method_values, model_values), []).append(p.name)
    rules = []
    for (_, _, method_values, model_values), tensors in groups.items():
        params = {q.name: v for q, v in zip(method.method_params, method_values)}
        params.update({q.name: list(row) for q, row in zip(method.model_params, model_values)})
        rules.append({"match": "re:^(?:" + "|".join(re.escape(n) for n in tensors) + ")$", "parameters": params})
    config = {"method": name, "models": [{"path": p} for p in paths], "slices": slices, "rules": rules,
              "parameters": {q.name: v for q, v in zip(method.method_params, default)}}
    if method.uses_base and name != "slerp" and base is not None:
        config["base"] = base
    return config


def _value(value, param):
    return param.default if value is None else value


def translate(data: dict, source: Path | None = None, warnings: list[str] | None = None) -> dict:
    """A mergekit config as a streammerge config dict (for config.parse_config); what mergekit would ignore is
    appended to `warnings`."""
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
    global_scope = _check_parameters(data.get("parameters"), method, f"{where}: parameters", True, warnings)
    if data.get("slices") is not None:
        if data.get("models") is not None:
            raise ConfigError(f"{where}: give either 'models' or 'slices', not both.")
        config = _translate_slices(data, method, global_scope, where, warnings)
    else:
        config = _translate_models(data, method, global_scope, where, warnings)
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
    base = _model_path(data["base_model"], f"{where}: base_model") if data.get("base_model") else None
    if base is not None:
        config["donor"] = _split(base)[0]  # mergekit takes the output's config and tokenizer from base_model
    for key in STREAMMERGE_KEYS:
        if data.get(key) is not None:
            config[key] = data[key]
    return config


def _translate_models(data: dict, method: Method, global_scope: dict, where: str, warnings: list[str]) -> dict:
    """mergekit `models` (whole models): parameters resolved per tensor, grouped into rules."""
    from streammerge.io import open_checkpoint

    name = method.name
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: 'models' must be a non-empty list of {{model: PATH, parameters: ...}}.")

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
    same = _same
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
    first = open_checkpoint(Path(_split(inputs[0][0])[0]))  # headers only: the tensor names
    try:
        names = list(first.tensors)
    finally:
        first.close()
    positions = layer_positions(names)

    def resolved(tensor: str) -> tuple:
        t = positions[tensor]
        method_values = []
        for p in method.method_params:
            value = resolve(p.name, [global_scope], tensor, t)
            method_values.append(p.default if value is None else value)
        model_values = []
        for p in method.model_params:
            row = []
            for _, own in inputs:
                value = resolve(p.name, [own, global_scope], tensor, t)
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
    return config
