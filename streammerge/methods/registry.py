"""The merge methods by name, found in the modules of this package.

Every module of `streammerge.methods` that defines `METHODS` (a sequence of `Method`) contributes them; so a new
method is one new module (plus its test), and method modules never import this one (no cycle). A name defined
twice is an error, not a silent override.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import pkgutil
from types import ModuleType
from typing import Iterable, Iterator

from streammerge.errors import ConfigError
from streammerge.methods.method import Method

PACKAGE = "streammerge.methods"


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the choice nearest to a misspelt name, or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry:
    def __init__(self):
        self._methods: dict[str, Method] = {}
        self._origin: dict[str, str] = {}

    def add(self, method: Method, origin: str) -> None:
        if method.name in self._methods:
            raise ValueError(f"merge method '{method.name}' is defined twice: in {self._origin[method.name]} and "
                             f"in {origin}; rename one of them.")
        self._methods[method.name] = method
        self._origin[method.name] = origin

    @classmethod
    def from_modules(cls, modules: Iterable[ModuleType]) -> "Registry":
        registry = cls()
        for module in modules:
            for method in getattr(module, "METHODS", ()):
                registry.add(method, module.__name__)
        return registry

    def get(self, name: str) -> Method:
        try:
            return self._methods[name]
        except KeyError:
            raise ConfigError(f"unknown merge method '{name}'{did_you_mean(name, self._methods)}; available: "
                              f"{', '.join(sorted(self._methods))}.") from None

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[Method]:
        return iter(sorted(self._methods.values(), key=lambda m: m.name))

    def names(self) -> list[str]:
        return sorted(self._methods)


def method_modules() -> list[ModuleType]:
    package = importlib.import_module(PACKAGE)
    names = sorted(info.name for info in pkgutil.iter_modules(package.__path__))
    return [importlib.import_module(f"{PACKAGE}.{name}") for name in names if name != "registry"]


@functools.cache
def methods() -> Registry:
    """Every method of the package (found on first use)."""
    return Registry.from_modules(method_modules())


def get_method(name: str) -> Method:
    return methods().get(name)
