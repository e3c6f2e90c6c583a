"""Hostile or careless configs: every one is a clean ConfigError (one paragraph, the file named), in bounded
time and memory, through the API and the command line; never a traceback, a hang or a silent reading."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from streammerge.config import load_config
from streammerge.config_file import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, MAX_CONFIG_NODES
from streammerge.errors import ConfigError, short
from streammerge.units import parse_size


@pytest.fixture
def models(tmp_path):
    paths = []
    for i in range(2):
        path = tmp_path / f"m{i}.safetensors"
        save_file({"w": torch.full((4,), float(i)), "b": torch.ones(2)}, path)
        paths.append(path)
    return paths


def config_text(models, extra: str = "", output: str = "out.safetensors") -> str:
    return (f"output: {output}\nmodels:\n  - path: {models[0]}\n    weight: 0.5\n"
            f"  - path: {models[1]}\n    weight: 0.5\n{extra}")


def refused(tmp_path, text: str | bytes, *fragments: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert time.monotonic() - started < 30  # generous: the machine running the suite may be busy
    message = str(info.value)
    assert str(path) in message, message
    assert len(message) < 2000, message[:300]
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- values of the wrong type or range ---------------------------------------------------------------------------

@pytest.mark.parametrize("line, fragment", [
    ("seed: abc", "seed"), ("seed: .nan", "seed"), ("seed: 1.0e+400", "seed"), ("seed: -1", "seed"),
    ("seed: 1.5", "seed"), ("seed: true", "seed"), ("seed: 99999999999999999999999", "seed"), ("seed: [1]", "seed"),
    ("max_ram: .inf", "max_ram"), ("max_ram: .nan", "max_ram"), ("max_ram: -.inf", "max_ram"),
    ("max_ram: " + "9" * 400, "max_ram"), ("max_ram: '" + "9" * 400 + "'", "max_ram"), ("max_ram: [1]", "max_ram"),
    ("max_ram: {a: 1}", "max_ram"), ("max_ram: 1e400GiB", "max_ram"),
    ("shard_size: .nan", "shard_size"), ("shard_size: 1.0e+400", "shard_size"), ("shard_size: 0", "shard_size"),
    ("shard_size: 99999999999TiB", "shard_size"),
    ("dtype: [float32]", "dtype"), ("dtype: 32", "dtype"), ("out_dtype: {a: b}", "out_dtype"),
    ("method: [linear]", "method"), ("method: {a: 1}", "method"),
    ("nan_policy: alow", "nan_policy"), ("nan_policy: true", "nan_policy"), ("nan_policy: [allow]", "nan_policy"),
    ("rules:\n  - match: '*'\n    weights: [.nan, 1]", "weights"),
    ("rules:\n  - match: '*'\n    weights: [1.0e+400, 1]", "weights"),
    ("rules:\n  - match: [a]\n    take: 0", "match"),
    ("rules:\n  - match: '*'\n    take: 1.0e+400", "take"),
    ("rename:\n  - pattern: [a]\n    replace: b", "pattern"),
    ("rename:\n  - pattern: 'a'\n    replace: [b]", "replace"),
])
def test_wrongly_typed_values(tmp_path, models, line, fragment):
    refused(tmp_path, config_text(models, line + "\n"), fragment)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1.0e+400", "9" * 400])
def test_model_parameters_must_be_finite(tmp_path, models, value):
    text = config_text(models).replace("weight: 0.5", f"weight: {value}", 1)
    refused(tmp_path, text, "weight")


def test_output_and_paths_must_be_strings(tmp_path, models):
    refused(tmp_path, config_text(models, output="[a, b]"), "output")
    refused(tmp_path, config_text(models).replace(f"path: {models[0]}", "path: {a: 1}"), "path")
    refused(tmp_path, config_text(models).replace(f"path: {models[0]}", f"path: {models[0]}\n    state_dict_key: [x]"),
            "state_dict_key")


def test_sizes_parse_exactly():
    assert parse_size("512MiB") == 512 * 1024**2
    assert parse_size("1.5GiB") == 3 * 1024**3 // 2
    assert parse_size(2.0e9) == 2_000_000_000
    for bad in [float("nan"), float("inf"), 10**400, "9" * 400, "1e3", "", "  ", "5 parsecs", None, [], True]:
        with pytest.raises(ConfigError):
            parse_size(bad, "max_ram")


@pytest.mark.parametrize("replace", ["\\9", "\\g<nope>", "\\g<1", "\\", "\\1"])
def test_rename_replacement_is_validated(tmp_path, models, replace):
    text = config_text(models, f"rename:\n  - pattern: '^w$'\n    replace: {yaml.safe_dump(replace).strip()}\n")
    refused(tmp_path, text, "rename[0] replace")


def test_valid_rename_replacement_still_works(tmp_path, models):
    path = tmp_path / "c.yaml"
    path.write_text(config_text(models, "rename:\n  - pattern: '^(w)$'\n    replace: 'x.\\1'\n"))
    assert load_config(path).rename[0].apply("w") == "x.w"


def test_nan_policy_values(tmp_path, models):
    for policy in ("error", "allow"):
        path = tmp_path / f"{policy}.yaml"
        path.write_text(config_text(models, f"nan_policy: {policy}\n"))
        assert load_config(path).nan_policy == policy


# -- encodings ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding, fragment", [("latin-1", "not UTF-8"), ("utf-16", "UTF-16"),
                                                ("utf-16-le", "not UTF-8"), ("utf-32", "UTF-32"),
                                                ("cp1252", "not UTF-8")])
def test_config_not_utf8(tmp_path, models, encoding, fragment):
    text = config_text(models, "# réglage: modèle à 50 %\n")
    refused(tmp_path, text.encode(encoding), fragment)


def test_utf8_with_bom_is_read(tmp_path, models):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + config_text(models, "# modèle\n").encode())
    assert len(load_config(path).models) == 2


# -- duplicate keys ----------------------------------------------------------------------------------------------

def test_duplicate_yaml_key_names_key_and_lines(tmp_path, models):
    text = config_text(models).replace("weight: 0.5", "weight: 0.9\n    weight: 0.1", 1)
    message = refused(tmp_path, text, "'weight'", "lines 4 and 5")
    assert "twice" in message


@pytest.mark.parametrize("extra", ["seed: 1\nseed: 2\n", "rules:\n  - match: a\n    take: 0\n    take: 1\n",
                                   "output: other.safetensors\n", "models: []\n"])
def test_duplicate_yaml_keys_anywhere(tmp_path, models, extra):
    refused(tmp_path, config_text(models, extra), "twice")


def test_duplicate_json_key(tmp_path, models):
    text = ('{"output": "o.safetensors", "models": [{"path": "%s", "weight": 0.9, "weight": 0.1}, '
            '{"path": "%s"}]}' % (models[0], models[1]))
    refused(tmp_path, text, "'weight'", "twice", name="c.json")


def test_yaml_merge_keys_are_not_duplicates(tmp_path, models):
    path = tmp_path / "c.yaml"
    path.write_text(f"output: o.safetensors\nmodels:\n  - &first {{path: {models[0]}, weight: 0.5}}\n"
                    f"  - <<: *first\n    path: {models[1]}\n")
    config = load_config(path)
    assert [m.path for m in config.models] == models


# -- aliases, nesting, sizes, special files ----------------------------------------------------------------------

def alias_bomb(levels: int = 30) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("key", ["take", "dtype", "output", "max_ram", "weight", "method", "seed", "match",
                                 "nan_policy", "shard_size", "unknown_key"])
def test_alias_bomb_is_refused_quickly(tmp_path, models, key):
    bomb = alias_bomb()
    assert len(bomb) < 1000
    if key == "weight":
        text = "anchors:\n" + "".join(f"  {line}\n" for line in bomb.splitlines()) + config_text(models).replace(
            "weight: 0.5", f"weight: *a{29}", 1)
    elif key == "take" or key == "match":
        text = ("anchors:\n" + "".join(f"  {line}\n" for line in bomb.splitlines())
                + config_text(models, f"rules:\n  - match: {'*a29' if key == 'match' else 'w'}\n"
                                      f"    take: {'*a29' if key == 'take' else 0}\n"))
    else:
        text = ("anchors:\n" + "".join(f"  {line}\n" for line in bomb.splitlines())
                + config_text(models, f"{key}: *a29\n"))
    refused(tmp_path, text, f"more than {MAX_CONFIG_NODES} values")


def test_small_aliases_are_fine(tmp_path, models):
    path = tmp_path / "c.yaml"
    path.write_text(f"output: o.safetensors\nmodels:\n  - {{path: {models[0]}, weight: &w 0.5}}\n"
                    f"  - {{path: {models[1]}, weight: *w}}\n")
    assert [m.params["weight"] for m in load_config(path).models] == [0.5, 0.5]


def test_recursive_alias_is_refused(tmp_path, models):
    refused(tmp_path, config_text(models, "x: &loop [1, *loop]\n"), "cycle")


def test_deep_nesting_is_refused(tmp_path, models):
    refused(tmp_path, config_text(models, "x: " + "[" * (MAX_CONFIG_DEPTH + 5) + "]" * (MAX_CONFIG_DEPTH + 5) + "\n"),
            "nests")
    refused(tmp_path, config_text(models, "x: " + "[" * 5_000 + "]" * 5_000 + "\n"), "nest")
    refused(tmp_path, '{"models": ' + "[" * 50_000 + "]" * 50_000 + "}", "nest", name="c.json")


def test_huge_integer_is_refused(tmp_path, models):
    refused(tmp_path, config_text(models, "seed: " + "7" * 5000 + "\n"))
    refused(tmp_path, '{"seed": ' + "7" * 5000 + "}", name="c.json")


def test_oversized_config_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.yaml"
    with open(path, "wb") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)
    with pytest.raises(ConfigError, match=f"the limit is {MAX_CONFIG_BYTES} bytes"):
        load_config(path)


@pytest.mark.parametrize("special", ["/dev/zero", "/dev/null", "/dev/urandom", "fifo", "dir"])
def test_config_that_is_not_a_regular_file(tmp_path, special):
    if special == "fifo":
        path = tmp_path / "c.yaml"
        os.mkfifo(path)
    elif special == "dir":
        path = tmp_path / "c.yaml"
        path.mkdir()
    else:
        path = Path(special)
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert time.monotonic() - started < 5
    assert str(path) in str(info.value)


def test_cli_fifo_and_dev_zero_configs(cli, tmp_path):
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        result = cli("merge", path, timeout=60)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert "not a regular file" in result.stderr


@pytest.mark.parametrize("line", ["seed: .nan", "max_ram: .inf", "nan_policy: alow", "seed: abc"])
def test_cli_bad_values_are_one_paragraph(cli, tmp_path, models, line):
    path = tmp_path / "c.yaml"
    path.write_text(config_text(models, line + "\n"))
    result = cli("merge", path, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("streammerge: error:") and "Traceback" not in result.stderr, result.stderr


def test_cli_max_ram_of_400_nines(cli, tmp_path, models):
    path = tmp_path / "c.yaml"
    path.write_text(config_text(models))
    result = cli("merge", path, "--max-ram", "9" * 400, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "max-ram" in result.stderr


def test_short_never_expands():
    value = ["x"] * 9
    for _ in range(60):
        value = [value, value]
    started = time.monotonic()
    text = short(value)
    assert len(text) <= 80 and time.monotonic() - started < 1
    assert short(10**5000).startswith("<")


# -- mergekit configs --------------------------------------------------------------------------------------------

def mergekit_text(models, parameters: str = "weight: 0.5", slices: str | None = None, extra: str = "") -> str:
    if slices is not None:
        body = (f"slices:\n  - sources:\n      - model: {models[0]}\n        layer_range: {slices}\n"
                f"      - model: {models[1]}\n        layer_range: {slices}\n")
    else:
        body = (f"models:\n  - model: {models[0]}\n    parameters:\n      {parameters}\n"
                f"  - model: {models[1]}\n    parameters:\n      weight: 0.5\n")
    return f"merge_method: linear\n{body}{extra}"


@pytest.mark.parametrize("parameters, fragment", [
    ("weight: [{filter: 5, value: 1}, {value: 0.5}]", "filter"),
    ("weight: [{filter: [a], value: 1}, {value: 0.5}]", "filter"),
    ("weight: [{filter: {a: 1}, value: 1}]", "filter"),
    ("weight: [{value: 1}, 5]", "conditions"),
    ("weight: {filter: w}", "neither"),
    ("weight: .nan", "weight"),
    ("weight: [.nan, 1]", "weight"),
    ("weight: abc", "weight"),
])
def test_mergekit_wrongly_typed_parameters(tmp_path, models, parameters, fragment):
    refused(tmp_path, mergekit_text(models, parameters), fragment, name="mk.yml")


@pytest.mark.parametrize("layer_range", ["5", "[0, [1]]", "[0]", "[0, 1, 2]", "['a', 'b']", "[0, .nan]",
                                         "[0, true]", "{a: 1}", "[-1, 2]"])
def test_mergekit_wrongly_typed_layer_range(tmp_path, models, layer_range):
    refused(tmp_path, mergekit_text(models, slices=layer_range), "layer_range", name="mk.yml")


@pytest.mark.parametrize("extra", ["dtype: [bfloat16]\n", "seed: .nan\n", "max_ram: .inf\n"])
def test_mergekit_wrongly_typed_top_level(tmp_path, models, extra):
    refused(tmp_path, mergekit_text(models, extra=extra), name="mk.yml")


def test_mergekit_method_must_be_a_name(tmp_path, models):
    refused(tmp_path, mergekit_text(models).replace("merge_method: linear", "merge_method: [linear]"),
            "merge_method", name="mk.yml")


@pytest.mark.parametrize("value", [".nan", ".inf", "1.0e+400", "9" * 400])
def test_integer_method_parameters_must_be_finite(tmp_path, models, value):
    text = config_text(models, f"method: karcher\nmax_iter: {value}\n").replace("    weight: 0.5\n", "")
    refused(tmp_path, text, "max_iter")
