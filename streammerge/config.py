"""The merge config (YAML or JSON): load, validate, and explain what is wrong."""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from streammerge.errors import ConfigError
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
TOP_LEVEL_KEYS = {"output", "models", "method", "rules", "dtype", "out_dtype", "max_ram", "shard_size", "base",
                  "parameters", "seed", "rename", "nan_policy", "slices"}
MODEL_KEYS = {"path", "state_dict_key", "rename", "parameters", "lora"}
SLICE_KEYS = {"sources", "base_layer_range"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
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
    source: Path | None = None
    slices: list[Slice] | None = None  # layer slices stacked into the output (None: whole models, name by name)

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


def read_config_file(path: Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror}).") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping with at least 'models' (and usually 'output').")
    return data


def load_config(path: Path) -> MergeConfig:
    data = read_config_file(path)
    from streammerge import mergekit_config

    if mergekit_config.is_mergekit_config(data):  # a mergekit YAML, run as it is
        data = mergekit_config.translate(data, Path(path))
    return parse_config(data, Path(path))


def _check_keys(data: dict, allowed: set, where: str, extra: set = frozenset()) -> None:
    unknown = [k for k in data if k not in allowed and k not in extra]
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'. Allowed here: {', '.join(sorted(allowed | extra))}.")


def _parse_rename(items, where: str) -> list[Rename]:
    if items is None:
        return []
    if not isinstance(items, list):
        raise ConfigError(f"{where}: 'rename' must be a list of {{pattern: REGEX, replace: STR}}.")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) - {"pattern", "replace"} or "pattern" not in item:
            raise ConfigError(f"{where}: rename[{i}] must be {{pattern: REGEX, replace: STR}}.")
        try:
            out.append(Rename(re.compile(str(item["pattern"])), str(item.get("replace", ""))))
        except re.error as exc:
            raise ConfigError(f"{where}: rename[{i}] pattern is not a valid regular expression ({exc}).") from None
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
    path, lora = _split_lora(str(entry["path"]), entry.get("lora"), where)
    return ModelSpec(path, params, str(key) if key is not None else None, _parse_rename(entry.get("rename"), where),
                     lora)


def _split_lora(path: str, lora, where: str) -> tuple[Path, Path | None]:
    """`MODEL+ADAPTER` (mergekit's LoRA reference) or `lora: ADAPTER` beside the path."""
    if "+" in path and not Path(path).exists():
        if lora is not None:
            raise ConfigError(f"{where}: give the LoRA adapter either as 'MODEL+ADAPTER' or as 'lora', not both.")
        path, lora = path.split("+", 1)
        if not path or not lora:
            raise ConfigError(f"{where}: '{path}+{lora}' must be MODEL+ADAPTER, both parts non-empty.")
    return Path(path), Path(str(lora)) if lora is not None else None


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
        raise ConfigError(f"{where}: take: {take!r} is not a model index; models are numbered "
                          f"0..{(n_models or 1) - 1}.")
    weights = entry.get("weights")
    if weights is not None:
        if (not isinstance(weights, list) or (n_models is not None and len(weights) != n_models)
                or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)):
            raise ConfigError(f"{where}: weights must be a list of {f'{n_models} ' if n_models else ''}numbers, one per model.")
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
    return Rule(str(entry["match"]), take, drop, weights, params, model_params)


def _dtype(value, table: dict, what: str) -> torch.dtype:
    try:
        return table[str(value).removeprefix("torch.")]
    except KeyError:
        raise ConfigError(f"{what}: unknown dtype {value!r}; use one of {', '.join(table)}.") from None


def parse_config(data: dict, source: Path | None = None) -> MergeConfig:
    where = str(source) if source else "config"
    method = get_method(str(data.get("method", "linear")))
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
        output=Path(str(data["output"])) if data.get("output") is not None else None,
        models=specs,
        method=method,
        params=params,
        rules=parsed_rules,
        dtype=_dtype(data.get("dtype", "float32"), ACCUMULATION_DTYPES, f"{where}: dtype"),
        out_dtype=_dtype(data["out_dtype"], OUTPUT_DTYPES, f"{where}: out_dtype") if data.get("out_dtype") else None,
        max_ram=parse_size(data["max_ram"], f"{where}: max_ram") if data.get("max_ram") is not None else None,
        shard_size=parse_size(data.get("shard_size", DEFAULT_SHARD_SIZE), f"{where}: shard_size"),
        base=_parse_model(base, method, f"{where}: base") if base is not None else None,
        seed=int(data.get("seed", 0)),
        rename=_parse_rename(data.get("rename"), where),
        nan_policy=str(data.get("nan_policy", "error")),
        source=source,
        slices=slices,
    )
    check_weights(config, where)
    return config


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
