"""`streammerge diff A B`: how far apart two checkpoints are, tensor by tensor and layer by layer.

For every float tensor both hold with the same shape: the relative L2 distance ||A - B|| / ||B|| and the cosine
similarity of A and B (with --base: of each input against the base). Tensors are streamed chunk by chunk under
the RAM budget with float64 sums, so checkpoints far larger than memory can be compared.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from streammerge import strict_json
from streammerge.config import DEFAULT_MAX_RAM
from streammerge.errors import StreamMergeError
from streammerge.io import open_checkpoint
from streammerge.layers import find_layer
from streammerge.memory import Budget
from streammerge.units import size_argument

BYTES_PER_ELEMENT = 3 * 8  # two float64 chunks and their difference


def group_of(name: str) -> str:
    """The layer a tensor belongs to ("model.layers.3"), else its first two name components."""
    layer = find_layer(name)
    if layer is not None:
        return layer[0]
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0]


@dataclass
class Sums:
    """Float64 sums from which distance and cosine follow; they add up across tensors of a group."""

    aa: float = 0.0
    bb: float = 0.0
    ab: float = 0.0
    dd: float = 0.0
    elements: int = 0

    def add(self, other: "Sums") -> None:
        self.aa += other.aa
        self.bb += other.bb
        self.ab += other.ab
        self.dd += other.dd
        self.elements += other.elements

    @property
    def relative_l2(self) -> float:
        return math.sqrt(self.dd) / math.sqrt(self.bb) if self.bb > 0 else (0.0 if self.dd == 0 else math.inf)

    @property
    def cosine(self) -> float:
        norm = math.sqrt(self.aa) * math.sqrt(self.bb)
        return self.ab / norm if norm > 0 else (1.0 if self.aa == self.bb == 0 else 0.0)


@dataclass
class Comparison:
    label: str
    tensors: dict[str, Sums] = field(default_factory=dict)
    only_first: list[str] = field(default_factory=list)
    only_second: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # shape or kind differs
    non_float_differ: list[str] = field(default_factory=list)

    def groups(self) -> dict[str, Sums]:
        out: dict[str, Sums] = {}
        for name, sums in self.tensors.items():
            out.setdefault(group_of(name), Sums()).add(sums)
        return out

    def total(self) -> Sums:
        total = Sums()
        for sums in self.tensors.values():
            total.add(sums)
        return total


def compare(first, second, label: str, chunk: int) -> Comparison:
    """Stream both checkpoints' common tensors chunk by chunk."""
    result = Comparison(label)
    a_buf = torch.empty(chunk, dtype=torch.float64)
    b_buf = torch.empty(chunk, dtype=torch.float64)
    for name, a in first.tensors.items():
        b = second.tensors.get(name)
        if b is None:
            result.only_first.append(name)
            continue
        if a.shape != b.shape or a.is_float != b.is_float:
            result.mismatched.append(name)
            continue
        if not a.is_float:
            if not all(torch.equal(a.read(s, min(a.numel, s + chunk)), b.read(s, min(a.numel, s + chunk)))
                       for s in range(0, a.numel, chunk)):
                result.non_float_differ.append(name)
            continue
        sums = Sums(elements=a.numel)
        for start in range(0, a.numel, chunk):
            stop = min(a.numel, start + chunk)
            x = a_buf[:stop - start].copy_(a.read(start, stop))
            y = b_buf[:stop - start].copy_(b.read(start, stop))
            sums.aa += float(torch.dot(x, x))
            sums.bb += float(torch.dot(y, y))
            sums.ab += float(torch.dot(x, y))
            x.sub_(y)
            sums.dd += float(torch.dot(x, x))
            a.release(start, stop)
            b.release(start, stop)
        result.tensors[name] = sums
    result.only_second = [n for n in second.tensors if n not in first.tensors]
    return result


def format_table(comparison: Comparison, per_tensor: bool) -> str:
    rows = comparison.tensors if per_tensor else comparison.groups()
    width = max([len(k) for k in rows] + [len("tensor" if per_tensor else "group"), 5])
    lines = [comparison.label,
             f"  {'tensor' if per_tensor else 'group':{width}s} {'elements':>12s} {'rel L2':>10s} {'cosine':>10s}"]
    for key, sums in rows.items():
        lines.append(f"  {key:{width}s} {sums.elements:12d} {sums.relative_l2:10.3e} {sums.cosine:10.6f}")
    total = comparison.total()
    lines.append(f"  {'all':{width}s} {total.elements:12d} {total.relative_l2:10.3e} {total.cosine:10.6f}")
    for what, names in (("only in the first", comparison.only_first), ("only in the second", comparison.only_second),
                        ("shape or kind differs", comparison.mismatched),
                        ("non-float tensors that differ", comparison.non_float_differ)):
        if names:
            lines.append(f"  {what}: {len(names)} ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''})")
    return "\n".join(lines)


def as_json(comparisons: list[Comparison]) -> dict:
    def entry(s: Sums) -> dict:
        return {"elements": s.elements, "relative_l2": s.relative_l2, "cosine": s.cosine}

    return {c.label: {"tensors": {k: entry(v) for k, v in c.tensors.items()},
                      "groups": {k: entry(v) for k, v in c.groups().items()},
                      "all": entry(c.total()), "only_first": c.only_first, "only_second": c.only_second,
                      "mismatched": c.mismatched, "non_float_differ": c.non_float_differ}
            for c in comparisons}


def plot(comparisons: list[Comparison], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise StreamMergeError("--plot needs matplotlib, which is an optional extra: install it with "
                               "`pip install 'streammerge[plot]'` (or `pip install matplotlib`), or leave out "
                               "--plot.") from None
    groups = list(dict.fromkeys(g for c in comparisons for g in c.groups()))
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, len(groups) * 0.25), 7), sharex=True)
    for c in comparisons:
        values = c.groups()
        top.plot(range(len(groups)), [values[g].relative_l2 if g in values else math.nan for g in groups],
                 marker=".", label=c.label)
        bottom.plot(range(len(groups)), [values[g].cosine if g in values else math.nan for g in groups],
                    marker=".", label=c.label)
    top.set_ylabel("relative L2 distance")
    bottom.set_ylabel("cosine similarity")
    bottom.set_xticks(range(len(groups)), groups, rotation=90, fontsize=6)
    top.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def add_diff_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "diff", help="relative L2 distance and cosine similarity between checkpoints, per tensor and layer",
        description="Compare checkpoints tensor by tensor, streamed chunk by chunk under a RAM budget: relative "
                    "L2 distance ||A - B|| / ||B|| and cosine similarity, grouped by layer. With --base, each "
                    "input is compared against the base.")
    p.add_argument("inputs", nargs="+", type=Path, metavar="CHECKPOINT", help="two checkpoints (or, with --base, "
                   "one or more)")
    p.add_argument("--base", type=Path, help="compare every input against this checkpoint")
    p.add_argument("--tensors", action="store_true", help="one row per tensor instead of per layer")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw the per-layer figures (needs "
                   "matplotlib: the `plot` extra)")
    p.add_argument("--max-ram", type=size_argument, metavar="SIZE", help="peak RAM budget (default 1GiB, capped at half "
                   "of the available memory)")
    p.set_defaults(handler=run_diff)


def run_diff(args) -> int:
    if args.base is None and len(args.inputs) != 2:
        raise StreamMergeError(f"diff compares two checkpoints (got {len(args.inputs)}); to compare several, give "
                               "--base and compare each against it.")
    budget = Budget(args.max_ram, BYTES_PER_ELEMENT, DEFAULT_MAX_RAM)
    opened = []
    try:
        for path in args.inputs + ([args.base] if args.base else []):
            opened.append(open_checkpoint(path, max_ram=args.max_ram))
        if args.base is None:
            pairs = [(opened[0], opened[1], f"{args.inputs[0]} vs {args.inputs[1]}")]
        else:
            pairs = [(c, opened[-1], f"{path} vs base {args.base}") for c, path in zip(opened, args.inputs)]
        comparisons = [compare(a, b, label, budget.chunk_elements) for a, b, label in pairs]
    finally:
        for c in opened:
            c.close()
    if args.json:
        print(strict_json.dumps(as_json(comparisons), indent=2))
    else:
        print("\n\n".join(format_table(c, args.tensors) for c in comparisons))
    if args.plot:
        plot(comparisons, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0
