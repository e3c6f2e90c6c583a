"""The plan: which output tensor comes from where, by which rule, in which order.

Built from headers alone (no tensor data is read): the union of names across the models after renames,
checked for missing names and shape or kind mismatches, with tied tensors (several names, one storage)
computed once.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import torch

from streammerge.config import MergeConfig, Rule
from streammerge.errors import PlanError
from streammerge.io import Checkpoint, TensorInfo
from streammerge.layers import split_layer_name
from streammerge.slices import output_layers, place

MERGE, COPY = "merge", "copy"
MAX_LISTED = 5


@dataclass(slots=True)  # a plan may hold 100,000s of them
class TensorTask:
    name: str
    shape: tuple
    out_dtype: torch.dtype
    kind: str  # MERGE: run the method over `sources`; COPY: copy sources[0] (after checking `must_equal`)
    sources: list[TensorInfo]
    rule: str  # label of the rule that decided this tensor ("default" when none matched)
    # Shared by every task of one rule (a plan may hold 100,000s of tasks): never modified in place.
    model_params: list[dict] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    base: TensorInfo | None = None
    must_equal: tuple[TensorInfo, ...] = ()  # non-float inputs that must match sources[0]
    aliases: tuple[str, ...] = ()  # tied names written with the same bytes

    @property
    def numel(self) -> int:
        return self.sources[0].numel

    @property
    def out_bytes(self) -> int:
        return self.numel * self.out_dtype.itemsize

    @property
    def inputs(self) -> list[TensorInfo]:
        """What the method reads: the models' tensors, then the base's if there is one."""
        return self.sources + ([self.base] if self.base is not None else [])

    @property
    def read_bytes(self) -> int:
        return sum(i.nbytes for i in self.inputs) + sum(i.nbytes for i in self.must_equal)


@dataclass
class Plan:
    tasks: list[TensorTask]
    dropped: dict[str, str]  # name -> label of the rule that dropped it
    config_updates: dict = field(default_factory=dict)  # config.json fields the plan changes (num_hidden_layers)

    @property
    def entries(self) -> list[tuple[str, torch.dtype, tuple]]:
        """Every output tensor (aliases included) in processing order."""
        out = []
        for t in self.tasks:
            out.append((t.name, t.out_dtype, t.shape))
            out.extend((a, t.out_dtype, t.shape) for a in t.aliases)
        return out

    @property
    def max_inputs(self) -> int:
        """The most tensors one output tensor is read from (each needs a scratch buffer)."""
        return max(len(t.sources) + (t.base is not None) for t in self.tasks)

    @property
    def output_bytes(self) -> int:
        return sum(t.out_bytes * (1 + len(t.aliases)) for t in self.tasks)

    @property
    def read_bytes(self) -> int:
        return sum(t.read_bytes for t in self.tasks)

    def tensors_per_rule(self) -> Counter:
        counts = Counter()
        for t in self.tasks:
            counts[t.rule] += 1 + len(t.aliases)
        for label in self.dropped.values():
            counts[label] += 1
        return counts


def renamed_tensors(checkpoint: Checkpoint, renames) -> dict[str, TensorInfo]:
    """The checkpoint's tensors under their renamed names (file order kept)."""
    out: dict[str, TensorInfo] = {}
    for name, info in checkpoint.tensors.items():
        new = name
        for rename in renames:
            new = rename.apply(new)
        if new in out:
            raise PlanError(f"{checkpoint.path}: renaming maps both '{out[new].name}' and '{name}' to '{new}'; "
                            "adjust the rename patterns so names stay unique.")
        out[new] = info
    return out


def _first_rule(rules: list[Rule], name: str) -> tuple[int, Rule | None]:
    for i, rule in enumerate(rules):
        if rule.matches(name):
            return i, rule
    return -1, None


def _describe(info: TensorInfo) -> str:
    return f"{list(info.shape)} {str(info.dtype).removeprefix('torch.')}"


@dataclass(frozen=True)
class Wanted:
    """One output tensor: the input tensor it is made from in each merged model, and their parameters."""

    name: str
    inputs: list[tuple[int, str]]  # (model index, input tensor name), one per merged input
    model_params: list[dict]
    base_input: str | None


def wanted_tensors(config: MergeConfig, models: list[dict[str, TensorInfo]]) -> Iterable[Wanted]:
    """Whole models: the union of the names, each read under its own name from every model. Slices: the
    stacked, renumbered layers and the tensors around them."""
    if config.slices is None:
        names = dict.fromkeys(n for m in models for n in m)
        everyone = [dict(spec.params) for spec in config.models]
        return (Wanted(n, [(i, n) for i in range(len(models))], everyone, n) for n in names)  # one at a time
    out = []
    for p in place(config.slices, lambda i: list(models[i]), lambda i: str(config.models[i].label)):
        sources = config.slices[p.slice_index].sources[:len(p.inputs)]
        out.append(Wanted(p.name, [(s.model, n) for s, n in zip(sources, p.inputs)],
                          [dict(s.params) for s in sources], p.base_input))
    return out


def build_plan(config: MergeConfig, checkpoints: list[Checkpoint], base: Checkpoint | None = None) -> Plan:
    empty = [c for c in checkpoints + ([base] if base is not None else []) if not c.tensors]
    if empty:
        raise PlanError(f"{empty[0].path}: holds no tensors (its {empty[0].format} header lists none), so there is "
                        "nothing to merge from it. Check that this is the checkpoint you meant.")
    models = [renamed_tensors(c, config.rename + spec.rename) for c, spec in zip(checkpoints, config.models)]
    base_tensors = renamed_tensors(base, config.rename + config.base.rename) if base is not None else None
    tasks: list[TensorTask] = []
    dropped: dict[str, str] = {}
    missing, mismatched = [], []
    # where sources[0] lies -> (the task reading it there, its rule index), or {signature: task} when several do
    by_place: dict[int, tuple[TensorTask, int] | dict[tuple, TensorTask]] = {}
    # (rule, the wanted tensor's per-model parameters) -> (model params, params, problem): one copy per rule
    shared_params: dict[tuple, tuple[list[dict], dict, str | None, list[dict]]] = {}
    for wanted in wanted_tensors(config, models):
        name = wanted.name
        rule_index, rule = _first_rule(config.rules, name)
        if rule is not None and rule.drop:
            dropped[name] = rule.label
            continue
        label = rule.label if rule is not None else "default"
        _check_rule_fits(rule, wanted)
        present = [models[i].get(n) for i, n in wanted.inputs]
        if rule is not None and rule.take is not None:
            source = present[rule.take]
            if source is None:
                model, source_name = wanted.inputs[rule.take]
                raise PlanError(f"rule '{rule.match}' takes '{name}' from models[{model}] "
                                f"({checkpoints[model].path}), which has no tensor '{source_name}'.")
            task = TensorTask(name, source.shape, _out_dtype(config, source), COPY, [source], label)
        else:
            absent = [i for i, info in enumerate(present) if info is None]
            if absent:
                missing.append((name, [wanted.inputs[i][0] for i in absent]))
                continue
            first = present[0]
            odd = next((i for i, info in enumerate(present)
                        if info.shape != first.shape or info.is_float != first.is_float
                        or (not first.is_float and info.dtype != first.dtype)), None)
            if odd is not None:
                mismatched.append((name, wanted.inputs[0][0], first, wanted.inputs[odd][0], present[odd]))
                continue
            if not first.is_float:
                task = TensorTask(name, first.shape, first.dtype, COPY, [first], label,
                                  must_equal=tuple(present[1:]))
            else:
                task = TensorTask(name, first.shape, _out_dtype(config, first), MERGE, present, label)
                key = (rule_index, id(wanted.model_params))
                if key not in shared_params:  # (holding the list keeps its id from being reused)
                    shared_params[key] = (*_task_params(config, rule, wanted.model_params), wanted.model_params)
                task.model_params, task.params, problem, _ = shared_params[key]
                if config.method.needs_base or (config.method.accepts_base and base_tensors is not None):
                    task.base = _base_tensor(base_tensors, base, wanted.base_input, first)
                if problem:
                    raise PlanError(f"'{name}' (rule {label}): {problem}.")
        # Tied: the same rule over the same bytes. Tasks sharing bytes share where sources[0] lies, so the full
        # signature is only worked out for tasks that do (a plan may hold 100,000s of tasks; almost none do).
        first = task.sources[0]
        place = (id(first.file) << 64) | first.offset
        earlier = by_place.get(place)
        if earlier is None:
            by_place[place] = (task, rule_index)
            tasks.append(task)
            continue
        if isinstance(earlier, tuple):
            earlier = by_place[place] = {_signature(*earlier, config): earlier[0]}
        signature = _signature(task, rule_index, config)
        if signature in earlier:
            earlier[signature].aliases += (name,)
            continue
        earlier[signature] = task
        tasks.append(task)
    if missing or mismatched:
        raise PlanError(_mismatch_message(missing, mismatched, checkpoints))
    if not tasks:
        raise PlanError("nothing to merge: every tensor was dropped by the rules.")
    updates = {"num_hidden_layers": output_layers(config.slices)} if config.slices is not None else {}
    return Plan(tasks, dropped, updates)


def _signature(task: TensorTask, rule_index: int, config: MergeConfig) -> tuple:
    """Tasks with equal signatures compute the same bytes: one is computed, the others are its aliases."""
    signature = (rule_index, task.kind, tuple(s.storage_key for s in (*task.sources, *task.must_equal)),
                 task.base.storage_key if task.base is not None else None, task.out_dtype)
    if config.slices is not None:  # a layer used twice is read twice, each output tensor from the mapping
        signature += (split_layer_name(task.name)[1] if split_layer_name(task.name) else None,)
    return signature


def _task_params(config: MergeConfig, rule: Rule | None, model_params: list[dict]):
    """The per-model and method parameters of a tensor that `rule` decides, and why the method refuses them
    (None when it does not)."""
    per_model = [dict(params) for params in model_params]
    if rule is not None and rule.weights is not None:
        for params, weight in zip(per_model, rule.weights):
            params["weight"] = weight
    for key, values in (rule.model_params.items() if rule is not None else ()):
        for params, value in zip(per_model, values):
            if value is not None:
                params[key] = value
    params = {**config.params, **(rule.params if rule is not None else {})}
    problem = config.method.check(params, per_model) if config.method.check else None
    return per_model, params, problem


def _check_rule_fits(rule: Rule | None, wanted: Wanted) -> None:
    """With slices, a rule's per-model lists index the sources of the tensor's slice: check they fit."""
    if rule is None:
        return
    n = len(wanted.inputs)
    lists = ([("weights", rule.weights)] if rule.weights is not None else []) + list(rule.model_params.items())
    for key, values in lists:
        if len(values) != n:
            raise PlanError(f"rule '{rule.match}': '{key}' gives {len(values)} value(s) but '{wanted.name}' is "
                            f"merged from {n} model(s); give one value per model.")
    if rule.take is not None and rule.take >= n:
        raise PlanError(f"rule '{rule.match}': take: {rule.take} but '{wanted.name}' is merged from {n} model(s).")


def _base_tensor(base_tensors, base: Checkpoint | None, name: str | None, like: TensorInfo) -> TensorInfo:
    if base_tensors is None or name is None:
        raise PlanError("this merge method needs a base model: add `base: PATH` to the config.")
    info = base_tensors.get(name)
    if info is None or info.shape != like.shape or not info.is_float:
        found = _describe(info) if info is not None else "nothing"
        raise PlanError(f"{base.path}: the base model has {found} for '{name}', but the models have "
                        f"{_describe(like)}. Use a base of the same architecture, or a take/drop rule for it.")
    return info


def _out_dtype(config: MergeConfig, info: TensorInfo) -> torch.dtype:
    return config.out_dtype if (config.out_dtype is not None and info.is_float) else info.dtype


def _mismatch_message(missing, mismatched, checkpoints) -> str:
    parts = []
    if missing:
        listed = "; ".join(f"'{n}' missing from {', '.join(str(checkpoints[i].path) for i in absent)}"
                           for n, absent in missing[:MAX_LISTED])
        more = f" (and {len(missing) - MAX_LISTED} more)" if len(missing) > MAX_LISTED else ""
        parts.append(f"{len(missing)} tensor name(s) are not in every model: {listed}{more}")
    if mismatched:
        listed = "; ".join(f"'{n}' is {_describe(a)} in {checkpoints[i].path} but {_describe(b)} in "
                           f"{checkpoints[j].path}" for n, i, a, j, b in mismatched[:MAX_LISTED])
        more = f" (and {len(mismatched) - MAX_LISTED} more)" if len(mismatched) > MAX_LISTED else ""
        parts.append(f"{len(mismatched)} tensor(s) differ in shape or kind: {listed}{more}")
    return ("the models do not have the same tensors: " + ". ".join(parts) + ". Check that all models share one "
            "architecture, map differing names with `rename`, or add `drop: true` / `take: N` rules for these "
            "tensors (merging only the intersection or union of names is not supported yet).")
