"""JSON that strict parsers accept: NaN and ±Infinity (which `json.dumps` writes bare) become null."""

from __future__ import annotations

import json
import math


def finite(value):
    """`value` with every non-finite float replaced by None (containers are copied, other values kept)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value, **options) -> str:
    return json.dumps(finite(value), allow_nan=False, **options)
