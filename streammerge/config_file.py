"""Reading a config file (YAML or JSON) within fixed bounds, whatever the file holds.

A config is small and written by hand, so anything far beyond that is refused before it can cost time or
memory: only a regular file is read (never a FIFO, a device or /dev/zero), at most MAX_CONFIG_BYTES of it;
the text must be UTF-8; YAML aliases may not expand the document beyond MAX_CONFIG_NODES values (an alias
bomb of a few hundred bytes would otherwise become gigabytes when a value is printed or walked), nor nest
beyond MAX_CONFIG_DEPTH; a key repeated in one mapping is an error naming the key and its line (YAML and
JSON parsers otherwise keep the last one silently).
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path

import yaml

from streammerge.errors import ConfigError, short
from streammerge.files import read_regular_file

MAX_CONFIG_BYTES = 4 * 1024**2
MAX_CONFIG_NODES = 100_000
MAX_CONFIG_DEPTH = 64

_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
         (codecs.BOM_UTF16_BE, "UTF-16"))


def decode_utf8(raw: bytes, path: Path, what: str = "config") -> str:
    for bom, name in _BOMS:
        if raw.startswith(bom):
            raise ConfigError(f"{path}: the {what} is encoded as {name}; save it as UTF-8 and run again.")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: the {what} is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}; "
                          "perhaps Latin-1 or UTF-16). Save it as UTF-8 and run again.") from None


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses repeated keys and documents that aliases expand beyond the bounds."""

    def compose_document(self):
        node = super().compose_document()
        _check_expansion(node, self.name)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise ConfigError(f"{self.name}: key {short(key_node.value)} is given twice in one mapping "
                                      f"(lines {seen[key] + 1} and {key_node.start_mark.line + 1}); YAML would "
                                      "silently keep the last one. Remove one of them.")
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _check_expansion(root, name: str) -> None:
    """Count the values the document holds once every alias is expanded (shared nodes counted each time they
    are used), without expanding anything; refuse cycles, too many values and too deep nesting."""
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = ([c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        if done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            depths[key] = 1 + max((depths[id(c)] for c in children), default=0)
            if sizes[key] > MAX_CONFIG_NODES:
                raise ConfigError(f"{name}: the config expands to more than {MAX_CONFIG_NODES} values (YAML "
                                  "aliases repeating large parts); a merge config is far smaller. Write it out "
                                  "without nested aliases.")
            if depths[key] > MAX_CONFIG_DEPTH:
                raise ConfigError(f"{name}: the config nests more than {MAX_CONFIG_DEPTH} levels deep; a merge "
                                  "config is far flatter.")
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise ConfigError(f"{name}: a YAML alias refers to a value that contains it (a cycle, line "
                              f"{node.start_mark.line + 1}); write the value out instead.")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)


def _json_pairs(path: Path, text: str):
    def build(pairs: list) -> dict:
        out = {}
        for key, value in pairs:
            if key in out:
                lines = [text.count("\n", 0, m.start()) + 1
                         for m in re.finditer(re.escape(json.dumps(key)) + r"\s*:", text)]
                where = f" (lines {', '.join(map(str, lines[:4]))})" if len(lines) > 1 else ""
                raise ConfigError(f"{path}: key {short(key)} is given twice in one object{where}; JSON readers "
                                  "would silently keep the last one. Remove one of them.")
            out[key] = value
        return out
    return build


def parse_config_text(text: str, path: Path, as_json: bool):
    kind = "JSON" if as_json else "YAML"
    try:
        if as_json:
            return json.loads(text, object_pairs_hook=_json_pairs(path, text))
        loader = _BoundedLoader(text)
        loader.name = str(path)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {kind}: {str(exc)[:500]}") from None
    except RecursionError:
        raise ConfigError(f"{path}: the config nests too deeply to be a merge config.") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{path}: not a usable {kind} config ({str(exc)[:200]}).") from None


def read_config_file(path: Path) -> dict:
    path = Path(path)
    text = decode_utf8(read_regular_file(path, MAX_CONFIG_BYTES, "config"), path)
    data = parse_config_text(text, path, path.suffix.lower() == ".json")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping with at least 'models' (and usually 'output').")
    return data
