"""The method registry: every method module found, duplicate names refused, misspelt names answered with the
nearest one; method modules never import the registry."""

from __future__ import annotations

import ast
import types
from pathlib import Path

import pytest

import streammerge.methods
from streammerge.config import parse_config
from streammerge.errors import ConfigError
from streammerge.mergekit_config import translate
from streammerge.methods.method import Method
from streammerge.methods.registry import Registry, method_modules, methods

PACKAGE_DIR = Path(streammerge.methods.__file__).parent


def _noop(ctx, stats):
    return ctx.out


def test_every_module_of_the_package_is_searched():
    files = {p.stem for p in PACKAGE_DIR.glob("*.py")} - {"__init__", "registry"}
    assert {m.__name__.rsplit(".", 1)[1] for m in method_modules()} == files
    found = methods().names()
    for expected in ("linear", "ties", "della", "slerp", "model_stock", "passthrough", "add_difference"):
        assert expected in found
    for module in method_modules():
        for method in getattr(module, "METHODS", ()):
            assert methods().get(method.name) is method


def test_a_new_module_with_methods_is_registered():
    module = types.ModuleType("streammerge.methods.example")
    module.METHODS = (Method("example", "an example", _noop),)
    registry = Registry.from_modules(method_modules() + [module])
    assert registry.get("example") is module.METHODS[0]
    assert "example" in registry and "linear" in registry


def test_duplicate_names_are_refused():
    first = types.ModuleType("streammerge.methods.one")
    first.METHODS = (Method("same", "first", _noop),)
    second = types.ModuleType("streammerge.methods.two")
    second.METHODS = (Method("same", "second", _noop),)
    with pytest.raises(ValueError, match="'same' is defined twice: in streammerge.methods.one and in "
                                         "streammerge.methods.two"):
        Registry.from_modules([first, second])


def test_method_modules_do_not_import_the_registry():
    for path in PACKAGE_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        if path.stem != "registry":
            assert "streammerge.methods.registry" not in imported, path.name
        if path.stem == "__init__":
            assert not imported, "the package's __init__ imports nothing (no cycle with its modules)"


def test_misspelt_method_suggests_the_nearest_name():
    with pytest.raises(ConfigError, match=r"unknown merge method 'tiez' \(did you mean 'ties'\?\); available: "):
        parse_config({"method": "tiez", "models": [{"path": "a.safetensors"}], "output": "o.safetensors"})
    with pytest.raises(ConfigError, match=r"unknown merge method 'qqq'; available: add_difference, "):
        parse_config({"method": "qqq", "models": [{"path": "a.safetensors"}], "output": "o.safetensors"})


def test_misspelt_parameter_suggests_the_nearest_name():
    with pytest.raises(ConfigError, match=r"'densty' is not a model parameter of method 'ties' \(did you mean "
                                          r"'density'\?\)"):
        parse_config({"method": "ties", "base": "b.safetensors", "output": "o.safetensors",
                      "models": [{"path": "a.safetensors", "parameters": {"densty": 0.5}}]})


def test_mergekit_config_suggests_and_refuses_streammerge_only_methods():
    with pytest.raises(ConfigError, match=r"merge_method 'slerpp' is not available in streammerge \(did you mean "
                                          r"'slerp'\?\)"):
        translate({"merge_method": "slerpp", "models": [{"model": "a"}]})
    with pytest.raises(ConfigError, match=r"merge_method 'add_difference' is not available"):
        translate({"merge_method": "add_difference", "models": [{"model": "a"}]})
