"""Layer numbers in tensor names: `model.layers.3.mlp.up_proj.weight` is in layer 3 (the names transformers,
GPT-2 (`h.3`) and vision/audio models (`blocks.3`) use)."""

from __future__ import annotations

import re

LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def find_layer(name: str) -> tuple[str, int] | None:
    """The first layer component of `name`: its prefix ("model.layers.3") and number (3); None outside layers."""
    match = LAYER.search(name)
    if match is None:
        return None
    return name[:match.end() - 1], int(match.group(1))


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """(prefix, layer number, suffix) of a layer tensor's name ("model.layers.", 3, ".mlp.up_proj.weight"), or
    None outside the layers."""
    match = LAYER.search(name)
    if match is None:
        return None
    return name[:match.start(1)], int(match.group(1)), name[match.end(1):]
