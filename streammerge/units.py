"""Byte sizes: parse `512MiB`, `2GB`, `1.5GiB`, plain bytes; format for humans."""

import argparse
import re

from streammerge.errors import ConfigError, StreamMergeError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(value, what="size") -> int:
    """Bytes from an int or a string such as '512MiB' (binary) or '5GB' (decimal)."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size such as 512MiB or 2GB, got {value!r}.")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ConfigError(f"{what}: must be positive, got {value!r}.")
        return int(value)
    match = _SIZE.match(str(value))
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise ConfigError(
            f"{what}: cannot read {value!r} as a size; write e.g. 512MiB, 1.5GiB, 2GB or a number of bytes.")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{what}: must be positive, got {value!r}.")
    return size


def size_argument(text: str) -> int:
    """An argparse `type=` for sizes: a bad size is reported as a usage error."""
    try:
        return parse_size(text, "size")
    except StreamMergeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"
