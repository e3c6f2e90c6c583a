#!/usr/bin/env python3
"""Print the README's table of merge methods from the method registry (tests check the README matches).

    python scripts/methods_table.py            # print the table
    python scripts/methods_table.py --write    # replace the table in README.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from streammerge.methods.registry import methods

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- methods-table: begin -->", "<!-- methods-table: end -->"


def table() -> str:
    lines = [BEGIN, "| method | inputs | per-model parameters | method parameters | what it does |",
             "| --- | --- | --- | --- | --- |"]
    for m in methods():
        count = (f"{m.min_models}" if m.max_models == m.min_models else
                 f"{m.min_models}+" if m.max_models is None else f"{m.min_models}-{m.max_models}")
        inputs = count + (" + base" if m.needs_base else " (+ base)" if m.accepts_base else "")
        fmt = (lambda p: f"`{p.name}`" + (" (required)" if p.default is None else
                                          f"={str(p.default).lower() if isinstance(p.default, bool) else p.default}"))
        per_model = ", ".join(fmt(p) for p in m.model_params) or "-"
        method = ", ".join(fmt(p) for p in m.method_params) or "-"
        lines.append(f"| `{m.name}` | {inputs} | {per_model} | {method} | {m.help.replace('|', '/')} |")
    lines.append(END)
    return "\n".join(lines)


def main() -> int:
    if "--write" in sys.argv:
        text = README.read_text()
        start, stop = text.index(BEGIN), text.index(END) + len(END)
        README.write_text(text[:start] + table() + text[stop:])
    else:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
