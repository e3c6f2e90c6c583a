#!/usr/bin/env python3
"""The all-in-RAM approach streammerge replaces: load every checkpoint whole, sum w_i * x_i, save.

    python scripts/naive_merge.py OUT.safetensors IN1:W1 IN2:W2 ...
"""

import sys

from safetensors.torch import load_file, save_file


def main(argv):
    out, *inputs = argv
    pairs = [(p.rsplit(":", 1)[0], float(p.rsplit(":", 1)[1])) for p in inputs]
    total = sum(w for _, w in pairs)
    models = [(load_file(p), w / total) for p, w in pairs]
    merged = {}
    for name, first in models[0][0].items():
        if first.is_floating_point():
            merged[name] = sum(sd[name].float() * w for sd, w in models).to(first.dtype)
        else:
            merged[name] = first
    save_file(merged, out, metadata={"format": "pt"})


if __name__ == "__main__":
    main(sys.argv[1:])
