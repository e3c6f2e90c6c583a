"""Byte sizes: parse `512MiB`, `2GB`, `1.5GiB`, plain bytes; format for humans."""

import argparse
import re
from decimal import Decimal

from streammerge.errors import ConfigError, StreamMergeError, short

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
MAX_SIZE = 2**63 - 1
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(value, what="size") -> int:
    """Bytes from an int or a string such as '512MiB' (binary) or '5GB' (decimal); at most MAX_SIZE."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{what}: expected a size such as 512MiB or 2GB, got {short(value)}.")
    if isinstance(value, str):
        match = _SIZE.match(value) if len(value) <= 1000 else None
        unit = match and match.group(2).lower()
        if not match or unit not in _UNITS:
            raise ConfigError(f"{what}: cannot read {short(value)} as a size; write e.g. 512MiB, 1.5GiB, 2GB or a "
                              "number of bytes.")
        size = Decimal(match.group(1)) * _UNITS[unit]  # exact, whatever the number of digits
    else:
        try:
            size = Decimal(value)
        except (ValueError, ArithmeticError):
            size = Decimal("NaN")
    if not size.is_finite() or size > MAX_SIZE:
        raise ConfigError(f"{what}: {short(value)} is not a usable size (at most {MAX_SIZE} bytes, 8 EiB).")
    if int(size) <= 0:
        raise ConfigError(f"{what}: must be at least one byte, got {short(value)}.")
    return int(size)


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
