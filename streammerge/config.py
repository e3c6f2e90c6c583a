"""The merge config (YAML or JSON): load, validate, and explain what is wrong."""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from streammerge.config_file import read_config_file
from streammerge.errors import ConfigError, short
from streammerge.hf.tokenizer import TokenizerSpec, parse_tokenizer
from streammerge.io.output_spec import PTH_CONTAINERS
from streammerge.methods.method import Method, coerce_param
from streammerge.methods.registry import did_you_mean, get_method
from streammerge.slices import Slice, SliceSource
from streammerge.units import parse_size

ACCUMULATION_DTYPES = {"float32": torch.float32, "float64": torch.float64}
OUTPUT_DTYPES = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
    "half": torch.float16, "float": torch.float32, "double": torch.float64,
}
DEFAULT_MAX_RAM = 1024**3
DEFAULT_SHARD_SIZE = 5 * 1000**3
NAN_POLICIES = ("error", "allow")  # what a NaN/Inf in a merged tensor does: stop the run, or write and list it
MAX_SEED = 2**63 - 1
TOP_LEVEL_KEYS = {"output", "models", "method", "rules", "dtype", "out_dtype", "max_ram", "shard_size", "base",
                  "parameters", "seed", "rename", "nan_policy", "tokenizer", "chat_template", "donor", "slices",
                  "pth_container", "workers", "ray"}
MODEL_KEYS = {"path", "state_dict_key", "rename", "parameters", "lora"}
SLICE_KEYS = {"sources", "base_layer_range"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
RAY_KEYS = {"address", "max_retries"}
RULE_KEYS = {"match", "take", "weights", "drop", "parameters"}


@dataclass
class Rename:
    pattern: re.Pattern
    replace: str

    def apply(self, name: str) -> str:
        return self.pattern.sub(self.replace, name)


@dataclass
class ModelSpec:
    path: Path
    params: dict = field(default_factory=dict)  # per-model method parameters (weight, density, ...)
    state_dict_key: str | None = None
    rename: list[Rename] = field(default_factory=list)
    lora: Path | None = None  # a PEFT LoRA adapter directory applied to this model's tensors while reading

    @property
    def label(self) -> str:
        return f"{self.path}+{self.lora}" if self.lora is not None else str(self.path)


@dataclass
class Rule:
    match: str
    take: int | None = None
    drop: bool = False
    weights: list[float] | None = None
    params: dict = field(default_factory=dict)  # method parameter overrides for the matching tensors
    model_params: dict = field(default_factory=dict)  # per-model overrides: name -> one value (or None) per model

    def __post_init__(self):
        if self.match.startswith("re:"):
            try:
                self._regex = re.compile(self.match[3:])
            except re.error as exc:
                raise ConfigError(f"rule match '{self.match}': not a valid regular expression ({exc}).") from None
        else:
            self._regex = re.compile(fnmatch.translate(self.match))

    def matches(self, name: str) -> bool:
        return bool(self._regex.search(name) if self.match.startswith("re:") else self._regex.match(name))

    @property
    def label(self) -> str:
        action = ("drop" if self.drop else f"take {self.take}" if self.take is not None
                  else f"weights {self.weights}" if self.weights is not None
                  else f"parameters {({**self.params, **self.model_params})}")
        return f"{self.match} -> {action}"


@dataclass
class MergeConfig:
    output: Path | None
    models: list[ModelSpec]
    method: Method
    params: dict  # method parameters, defaults filled in
    rules: list[Rule] = field(default_factory=list)
    dtype: torch.dtype = torch.float32
    out_dtype: torch.dtype | None = None
    max_ram: int | None = None  # None: the default (1 GiB, capped by what is available)
    shard_size: int = DEFAULT_SHARD_SIZE
    base: ModelSpec | None = None
    seed: int = 0
    rename: list[Rename] = field(default_factory=list)
    nan_policy: str = "error"
    pth_container: str = "auto"  # how a .pth output lays out the state dict and the metadata (PTH_CONTAINERS)
    source: Path | None = None
    tokenizer: TokenizerSpec | None = None  # the output vocabulary (Hugging Face models)
    chat_template: str | None = None  # a built-in name, "auto" or a Jinja template
    donor: Path | None = None  # the output's config.json and tokenizer come from it (default: base, else models[0])
    warnings: list[str] = field(default_factory=list)  # what the config asks for that is ignored, and why
    slices: list[Slice] | None = None  # layer slices stacked into the output (None: whole models, name by name)
    workers: int | str = 1  # local worker processes; "auto": one per usable core
    ray: dict | None = None  # run on a Ray cluster: {"address": ..., "max_retries": ...}

    def recipe(self) -> dict:
        """A JSON-able description of the merge, stored in the output's metadata."""
        return {
            "method": self.method.name,
            "parameters": self.params,
            "models": [{"path": m.label, **m.params} for m in self.models],
            **({"slices": [{"sources": [{"model": s.model, "layer_range": list(s.layers), **s.params}
                                        for s in piece.sources],
                            **({"base_layer_range": list(piece.base_layers)} if piece.base_layers else {})}
                           for piece in self.slices]} if self.slices else {}),
            **({"base": str(self.base.path)} if self.base else {}),
            "rules": [r.label for r in self.rules],
            "dtype": str(self.dtype).removeprefix("torch."),
            **({"out_dtype": str(self.out_dtype).removeprefix("torch.")} if self.out_dtype else {}),
        }


def load_config(path: Path) -> MergeConfig:
    warnings: list[str] = []
    config = parse_config(native_config_data(read_config_file(path), Path(path), warnings), Path(path))
    config.warnings = warnings
    return config


def native_config_data(data: dict, path: Path, warnings: list[str]) -> dict:
    """A config file's data in streammerge's own form: a mergekit YAML is translated (and run as it is)."""
    from streammerge import mergekit_config

    mergekit_config.check_not_moe(data, str(path))
    if mergekit_config.is_mergekit_config(data):
        data = mergekit_config.translate(data, path, warnings)
    return data


def _check_keys(data: dict, allowed: set, where: str, extra: set = frozenset()) -> None:
    unknown = [k for k in data if k not in allowed and k not in extra]
    if unknown:
        raise ConfigError(f"{where}: unknown key {short(unknown[0])}. Allowed here: "
                          f"{', '.join(sorted(allowed | extra))}.")


def _text(value, what: str, hint: str = "a string") -> str:
    """A value that must be a string (a path, a name, a pattern); numbers are taken as written."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(f"{what}: expected {hint}, got {short(value)}.")
    return value


def _seed(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{where}: seed must be a whole number from 0 to {MAX_SEED}, got {short(value)}.")
    return value


def _choice(value, choices: tuple, what: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{what}: must be one of {', '.join(choices)}, got {short(value)}.")
    return value


def _parse_rename(items, where: str) -> list[Rename]:
    if items is None:
        return []
    if not isinstance(items, list):
        raise ConfigError(f"{where}: 'rename' must be a list of {{pattern: REGEX, replace: STR}}.")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) - {"pattern", "replace"} or "pattern" not in item:
            raise ConfigError(f"{where}: rename[{i}] must be {{pattern: REGEX, replace: STR}}.")
        pattern_text = _text(item["pattern"], f"{where}: rename[{i}] pattern", "a regular expression")
        replace = item.get("replace", "")
        if not isinstance(replace, str):
            raise ConfigError(f"{where}: rename[{i}] replace must be a string, got {short(replace)}.")
        try:
            pattern = re.compile(pattern_text)
        except re.error as exc:
            raise ConfigError(f"{where}: rename[{i}] pattern is not a valid regular expression ({exc}).") from None
        try:  # the replacement template is parsed (group references checked) even when nothing matches
            pattern.sub(replace, "")
        except (re.error, IndexError) as exc:
            raise ConfigError(f"{where}: rename[{i}] replace {short(replace)} is not a valid replacement for "
                              f"pattern {short(pattern_text)} ({exc}); refer to groups as \\1 or \\g<name>, "
                              "and write a literal backslash as \\\\.") from None
        out.append(Rename(pattern, replace))
    return out


def _parse_params(data: dict, method: Method, per_model: bool, where: str) -> dict:
    params = {}
    for key, value in data.items():
        param = method.param(key)
        if param is None or param.per_model != per_model:
            kind = "model" if per_model else "method"
            names = [p.name for p in (method.model_params if per_model else method.method_params)]
            raise ConfigError(f"{where}: '{key}' is not a {kind} parameter of method '{method.name}'"
                              f"{did_you_mean(key, names)} (those are: {', '.join(names) or 'none'}).")
        params[key] = coerce_param(param, value, where)
    return params


def _parse_model(entry, method: Method, where: str) -> ModelSpec:
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict) or "path" not in entry:
        raise ConfigError(f"{where}: each model needs a 'path'.")
    model_param_names = {p.name for p in method.model_params}
    _check_keys(entry, MODEL_KEYS, where, model_param_names)
    inline = {k: v for k, v in entry.items() if k in model_param_names}
    nested = entry.get("parameters") or {}
    if not isinstance(nested, dict):
        raise ConfigError(f"{where}: 'parameters' must be a mapping.")
    params = {p.name: p.default for p in method.model_params}
    params.update(_parse_params({**nested, **inline}, method, True, where))
    key = entry.get("state_dict_key")
    path, lora = _split_lora(_text(entry["path"], f"{where}: path", "a file or directory path"), entry.get("lora"),
                             where)
    key = _text(key, f"{where}: state_dict_key", "a (dotted) key") if key is not None else None
    return ModelSpec(path, params, key, _parse_rename(entry.get("rename"), where), lora)


def _split_lora(path: str, lora, where: str) -> tuple[Path, Path | None]:
    """`MODEL+ADAPTER` (mergekit's LoRA reference) or `lora: ADAPTER` beside the path."""
    if "+" in path and not Path(path).exists():
        if lora is not None:
            raise ConfigError(f"{where}: give the LoRA adapter either as 'MODEL+ADAPTER' or as 'lora', not both.")
        path, lora = path.split("+", 1)
        if not path or not lora:
            raise ConfigError(f"{where}: '{path}+{lora}' must be MODEL+ADAPTER, both parts non-empty.")
    return _model_path(path, where), _model_path(str(lora), f"{where} (LoRA adapter)") if lora is not None else None


def _model_path(reference: str, where: str) -> Path:
    """A local path as written; a Hub id (`org/name[@revision]`) as its snapshot in the local Hugging Face cache,
    else downloaded (see streammerge.hf.hub)."""
    from streammerge.hf import hub

    return hub.resolve(reference, where) if hub.looks_like_hub_id(reference) else Path(reference)


def _parse_rule(entry, n_models: int | None, method: Method, where: str) -> Rule:
    """`n_models` is None with slices: then per-model lists and `take` index the sources of each tensor's slice,
    and the plan checks their length."""
    if not isinstance(entry, dict) or "match" not in entry:
        raise ConfigError(f"{where}: each rule needs 'match' (a glob, or 're:' + a regular expression).")
    method_param_names = {p.name for p in method.method_params}
    model_param_names = {p.name for p in method.model_params}
    _check_keys(entry, RULE_KEYS, where, method_param_names | model_param_names)
    actions = [k for k in ("take", "weights", "drop") if k in entry]
    if len(actions) > 1:
        raise ConfigError(f"{where}: use only one of take / weights / drop in a rule (found {', '.join(actions)}).")
    take = entry.get("take")
    if take is not None and (isinstance(take, bool) or not isinstance(take, int) or take < 0
                             or (n_models is not None and take >= n_models)):
        raise ConfigError(f"{where}: take: {short(take)} is not a model index; models are numbered "
                          f"0..{(n_models or 1) - 1}.")
    weights = entry.get("weights")
    if weights is not None:
        if (not isinstance(weights, list) or (n_models is not None and len(weights) != n_models)
                or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and _finite(w) for w in weights)):
            raise ConfigError(f"{where}: weights must be a list of {f'{n_models} ' if n_models else ''}numbers "
                              f"(finite), one per model, got {short(weights)}.")
        weights = [float(w) for w in weights]
    drop = entry.get("drop", False)
    if not isinstance(drop, bool):
        raise ConfigError(f"{where}: drop must be true or false.")
    nested = entry.get("parameters") or {}
    if not isinstance(nested, dict):
        raise ConfigError(f"{where}: 'parameters' must be a mapping.")
    given = {**nested, **{k: v for k, v in entry.items() if k in method_param_names | model_param_names}}
    per_model = {k: v for k, v in given.items() if k in model_param_names}
    params = _parse_params({k: v for k, v in given.items() if k not in model_param_names}, method, False, where)
    model_params = {}
    for key, values in per_model.items():
        if weights is not None and key == "weight":
            raise ConfigError(f"{where}: give the weights either as 'weights' or as 'weight', not both.")
        if not isinstance(values, list) or (n_models is not None and len(values) != n_models):
            raise ConfigError(f"{where}: '{key}' is a per-model parameter: give a list of "
                              f"{f'{n_models} ' if n_models else ''}values, "
                              "one per model (null keeps that model's own value).")
        model_params[key] = [None if v is None else coerce_param(method.param(key), v, f"{where}: {key}[{i}]")
                             for i, v in enumerate(values)]
    if not actions and not params and not model_params:
        raise ConfigError(f"{where}: a rule needs one of take, weights, drop, or method parameters.")
    match = _text(entry["match"], f"{where}: match", "a glob, or 're:' + a regular expression")
    return Rule(match, take, drop, weights, params, model_params)


def _finite(number) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an int too large for a float
        return False


def _dtype(value, table: dict, what: str) -> torch.dtype:
    dtype = table.get(value.removeprefix("torch.")) if isinstance(value, str) else None
    if dtype is None:
        raise ConfigError(f"{what}: unknown dtype {short(value)}; use one of {', '.join(table)}.")
    return dtype


def parse_config(data: dict, source: Path | None = None) -> MergeConfig:
    where = str(source) if source else "config"
    method = get_method(_text(data.get("method", "linear"), f"{where}: method", "a method name"))
    method_param_names = {p.name for p in method.method_params}
    _check_keys(data, TOP_LEVEL_KEYS, where, method_param_names)
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{where}: 'models' must be a non-empty list of {{path: ..., weight: ...}}.")
    specs = [_parse_model(m, method, f"{where}: models[{i}]") for i, m in enumerate(models)]
    nested = data.get("parameters") or {}
    if not isinstance(nested, dict):
        raise ConfigError(f"{where}: 'parameters' must be a mapping.")
    params = {p.name: p.default for p in method.method_params}
    params.update(_parse_params({**nested, **{k: data[k] for k in method_param_names if k in data}},
                                method, False, where))
    rules = data.get("rules") or []
    if not isinstance(rules, list):
        raise ConfigError(f"{where}: 'rules' must be a list.")
    slices = _parse_slices(data.get("slices"), specs, method, data.get("base") is not None, where)
    n_models = len(specs) if slices is None else None
    parsed_rules = [_parse_rule(r, n_models, method, f"{where}: rules[{i}]") for i, r in enumerate(rules)]
    base = data.get("base")
    if base is not None and not method.uses_base:
        raise ConfigError(f"{where}: method '{method.name}' does not use a base model, but 'base' is set; remove "
                          "it, or choose a task-vector method (task_arithmetic, ties, dare_ties, ...).")
    if base is None and method.needs_base:
        raise ConfigError(f"{where}: method '{method.name}' needs a base model (the model the others were "
                          "fine-tuned from): add `base: PATH`.")
    if slices is None and not _count_fits(method, len(specs)):
        raise ConfigError(f"{where}: method '{method.name}' takes {_wanted(method)} model(s) in 'models'"
                          f"{' (besides the base)' if method.uses_base else ''}, but {len(specs)} are given.")
    config = MergeConfig(
        output=Path(_text(data["output"], f"{where}: output", "a path")) if data.get("output") is not None else None,
        models=specs,
        method=method,
        params=params,
        rules=parsed_rules,
        dtype=_dtype(data.get("dtype", "float32"), ACCUMULATION_DTYPES, f"{where}: dtype"),
        out_dtype=_dtype(data["out_dtype"], OUTPUT_DTYPES, f"{where}: out_dtype") if data.get("out_dtype") else None,
        max_ram=parse_size(data["max_ram"], f"{where}: max_ram") if data.get("max_ram") is not None else None,
        shard_size=parse_size(data.get("shard_size", DEFAULT_SHARD_SIZE), f"{where}: shard_size"),
        base=_parse_model(base, method, f"{where}: base") if base is not None else None,
        seed=_seed(data.get("seed", 0), where),
        rename=_parse_rename(data.get("rename"), where),
        nan_policy=_choice(data.get("nan_policy", "error"), NAN_POLICIES, f"{where}: nan_policy"),
        pth_container=_choice(data.get("pth_container", "auto"), PTH_CONTAINERS, f"{where}: pth_container"),
        source=source,
        tokenizer=(parse_tokenizer(data["tokenizer"], where, _local_model) if data.get("tokenizer") is not None
                   else None),
        chat_template=_chat_template(data.get("chat_template"), where),
        donor=_local_model(str(data["donor"]), f"{where}: donor") if data.get("donor") is not None else None,
        slices=slices,
        workers=parse_workers(data.get("workers", 1), f"{where}: workers"),
        ray=_parse_ray(data.get("ray"), where),
    )
    if config.ray is not None and config.workers != 1:
        raise ConfigError(f"{where}: use either 'workers' (processes on this machine) or 'ray' (a cluster), not both.")
    check_weights(config, where)
    return config


def _local_model(reference: str, where: str) -> Path:
    from streammerge.hf import hub

    return hub.resolve(reference, where)


def _chat_template(value, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: chat_template must be a built-in name (chatml, llama3, ...), auto, or a Jinja "
                          "template.")
    return value


def _wanted(method: Method) -> str:
    return (f"exactly {method.min_models}" if method.max_models == method.min_models else
            f"at least {method.min_models}" if method.max_models is None else
            f"{method.min_models} to {method.max_models}")


def _count_fits(method: Method, n: int) -> bool:
    return n >= method.min_models and (method.max_models is None or n <= method.max_models)


def _layer_range(value, where: str) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value) or not 0 <= value[0] < value[1]):
        raise ConfigError(f"{where}: layer_range must be [START, STOP] with 0 <= START < STOP (STOP exclusive), "
                          f"got {value!r}.")
    return int(value[0]), int(value[1])


def _parse_slices(items, specs: list[ModelSpec], method: Method, has_base: bool, where: str) -> list[Slice] | None:
    """`slices: [{sources: [{model: INDEX, layer_range: [A, B], <per-model parameters>}], base_layer_range}]`."""
    if items is None:
        return None
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: 'slices' must be a non-empty list of {{sources: [...]}}.")
    model_param_names = {p.name for p in method.model_params}
    slices = []
    for i, item in enumerate(items):
        at = f"{where}: slices[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("sources"), list) or not item["sources"]:
            raise ConfigError(f"{at}: a slice needs 'sources', a non-empty list of {{model: INDEX, layer_range: "
                              "[START, STOP]}.")
        _check_keys(item, SLICE_KEYS, at)
        sources = []
        for j, src in enumerate(item["sources"]):
            sat = f"{at}.sources[{j}]"
            if not isinstance(src, dict):
                raise ConfigError(f"{sat}: must be {{model: INDEX, layer_range: [START, STOP]}}.")
            _check_keys(src, SOURCE_KEYS, sat, model_param_names)
            model = src.get("model")
            if isinstance(model, bool) or not isinstance(model, int) or not 0 <= model < len(specs):
                raise ConfigError(f"{sat}: model: {model!r} is not a model index; models are numbered "
                                  f"0..{len(specs) - 1}.")
            nested = src.get("parameters") or {}
            if not isinstance(nested, dict):
                raise ConfigError(f"{sat}: 'parameters' must be a mapping.")
            params = dict(specs[model].params)
            params.update(_parse_params({**nested, **{k: v for k, v in src.items() if k in model_param_names}},
                                        method, True, sat))
            sources.append(SliceSource(model, _layer_range(src.get("layer_range"), f"{sat}"), params))
        lengths = {s.layers[1] - s.layers[0] for s in sources}
        if len(lengths) != 1:
            raise ConfigError(f"{at}: every source of a slice must span the same number of layers (got "
                              f"{', '.join(str(list(s.layers)) for s in sources)}).")
        if not _count_fits(method, len(sources)):
            raise ConfigError(f"{at}: method '{method.name}' takes {_wanted(method)} source(s) in a slice"
                              f"{' (besides the base)' if method.uses_base else ''}, but {len(sources)} are given.")
        base_layers = item.get("base_layer_range")
        if base_layers is not None:
            if not has_base:
                raise ConfigError(f"{at}: base_layer_range needs a `base` model.")
            base_layers = _layer_range(base_layers, f"{at}.base_layer_range")
            if base_layers[1] - base_layers[0] != next(iter(lengths)):
                raise ConfigError(f"{at}: base_layer_range spans {base_layers[1] - base_layers[0]} layers, the "
                                  f"sources {next(iter(lengths))}.")
        elif has_base:
            base_layers = sources[0].layers
        slices.append(Slice(tuple(sources), base_layers))
    return slices


def parse_workers(value, where: str) -> int | str:
    """A number of worker processes (1 or more), or "auto" (one per usable core)."""
    if value == "auto":
        return "auto"
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: {short(value)} is not a number of worker processes; give 1 or more, or 'auto'.")
    return value


def _parse_ray(value, where: str) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: 'ray' must be a mapping, e.g. {{address: auto}} (or {{}} for RAY_ADDRESS or a "
                          "local instance).")
    _check_keys(value, RAY_KEYS, f"{where}: ray")
    retries = value.get("max_retries", 3)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"{where}: ray: max_retries must be a whole number, 0 or more.")
    address = value.get("address")
    return {"address": None if address is None else str(address), "max_retries": retries}


def check_weights(config: MergeConfig, where: str) -> None:
    """Refuse weightings that cannot mean what the user intended."""
    if config.method.param("weight") is None or "normalize" not in config.params or config.method.uses_base:
        return  # task-vector methods take signed weights (a negative weight subtracts a task)
    sets = [("models", [m.params["weight"] for m in config.models])]
    sets += [(f"rule '{r.match}'", r.weights) for r in config.rules if r.weights is not None]
    for label, weights in sets:
        normalize = config.params["normalize"]
        if normalize and abs(sum(weights)) < 1e-12:
            raise ConfigError(f"{where}: the weights of {label} sum to zero, so they cannot be normalized; "
                              "change a weight or set normalize: false.")
        if normalize and any(w < 0 for w in weights):
            raise ConfigError(f"{where}: {label} has a negative weight ({weights}); normalizing negative weights "
                              "rarely means what you want. Set normalize: false to use them as given.")
