"""`streammerge inspect PATH [--json]`: what a checkpoint holds, from headers and pickles alone.

Lists the format, where the weights sit in the container, every tensor (name, shape, dtype, bytes) with
totals and the parameter count, tied tensors (several names, one storage), and the non-tensor metadata
(config, step, epoch, losses, other keys; optimizer state summarised). No tensor data is read, so a
multi-GB file is inspected in about a second with little memory. Pickled objects are read by the
restricted unpickler when torch's weights_only loader refuses them: nothing in the file is executed.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from streammerge import strict_json
from streammerge.units import format_size

SCALAR_FIELDS_SHOWN = 6
INLINE_JSON = 160


def add_inspect_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect", help="list a checkpoint's tensors and metadata without reading tensor data",
        description="List a checkpoint's format, container, tensors (name, shape, dtype, bytes), totals, tied "
                    "tensors and metadata, without reading tensor data or running anything from its pickle.")
    p.add_argument("path", type=Path, help="checkpoint file or directory (safetensors, shard index, .pth/.pt/.bin/"
                   ".ckpt in zip or legacy torch format)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--state-dict-key", metavar="KEY", help="dotted key of the weights inside the container, when "
                   "it is ambiguous (as `state_dict_key` in a merge config)")
    p.set_defaults(handler=run_inspect)


def run_inspect(args) -> int:
    report = inspect_checkpoint(args.path, args.state_dict_key)
    if args.json:
        print(strict_json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


def inspect_checkpoint(path, state_dict_key: str | None = None) -> dict:
    """The inspect report as a JSON-able dict."""
    from streammerge.io import open_checkpoint

    with open_checkpoint(path, state_dict_key=state_dict_key) as ckpt:
        tensors = {name: {"shape": list(info.shape), "dtype": _dtype(info.dtype), "bytes": info.nbytes}
                   for name, info in ckpt.tensors.items()}
        total, parameters, tied = shared_storage(ckpt.tensors.values())
        return {
            "path": str(ckpt.path),
            "format": ckpt.format,
            "container": ckpt.container,
            "count": len(tensors),
            "dtypes": dict(Counter(t["dtype"] for t in tensors.values()).most_common()),
            "total_bytes": total,
            "parameters": parameters,
            "tied": tied,
            "tensors": tensors,
            "metadata": ckpt.metadata,
        }


def shared_storage(infos) -> tuple[int, int, list[list[str]]]:
    """(data bytes, elements, groups of names sharing bytes): tensors whose byte ranges in one file overlap
    (tied weights, or views such as a transpose) are counted once and listed together."""
    spans = sorted((id(i.file), *i.span, i.name, i.itemsize) for i in infos)
    total = elements = 0
    groups: list[list[str]] = []
    current = None  # [file, start, end, itemsize, names]
    for file, start, nbytes, name, itemsize in spans + [(None, 0, 0, "", 1)]:
        if current and file == current[0] and nbytes and start < current[2]:
            current[2] = max(current[2], start + nbytes)
            current[4].append(name)
            continue
        if current:
            total += current[2] - current[1]
            elements += (current[2] - current[1]) // current[3]
            if len(current[4]) > 1:
                groups.append(current[4])
        current = [file, start, start + nbytes, itemsize, [name]]
    return total, elements, groups


def _dtype(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def format_report(report: dict) -> str:
    where = f"under '{report['container']}'" if report["container"] else "at the top level"
    lines = [f"{report['path']}: {report['format']}, weights {where}", ""]
    tensors = report["tensors"]
    if tensors:
        width = min(max(4, max(len(n) for n in tensors)), 80)
        shapes = {n: "[" + ", ".join(map(str, t["shape"])) + "]" for n, t in tensors.items()}
        swidth = max(5, max(len(s) for s in shapes.values()))
        lines.append(f"{'name':{width}s}  {'shape':{swidth}s}  {'dtype':14s}  {'bytes':>14s}")
        for name, t in tensors.items():
            lines.append(f"{name:{width}s}  {shapes[name]:{swidth}s}  {t['dtype']:14s}  {t['bytes']:14,d}")
        lines.append("")
    kinds = ", ".join(f"{n} {d}" for d, n in report["dtypes"].items())
    lines.append(f"tensors: {report['count']} ({kinds}); parameters: {report['parameters']:,}; "
                 f"data: {format_size(report['total_bytes'])} ({report['total_bytes']:,} bytes, shared storage once)")
    if report["tied"]:
        shown = "; ".join(" = ".join(g) for g in report["tied"][:10])
        more = f"; ... ({len(report['tied']) - 10} more)" if len(report["tied"]) > 10 else ""
        lines.append(f"tied: {len(report['tied'])} group(s) sharing storage: {shown}{more}")
    else:
        lines.append("tied: none")
    metadata = report["metadata"]
    if metadata:
        lines.append("metadata:")
        for key, value in metadata.items():
            lines.append(f"  {key}: {summarize_value(value)}")
    else:
        lines.append("metadata: none")
    return "\n".join(lines)


def summarize_value(value) -> str:
    """One line for a metadata value: small values inline, records and large dicts described."""
    if isinstance(value, Mapping):
        if "__summary__" in value:
            text = (f"{value['__summary__']}: {value.get('tensors', 0)} tensors, "
                    f"{format_size(value.get('tensor_bytes', 0))}")
            groups = value.get("param_groups") or []
            hyper = {k: v for g in groups[:1] for k, v in g.items() if isinstance(v, (int, float, str))}
            if hyper:
                text += "; param_groups[0]: " + ", ".join(f"{k}={v}" for k, v in list(hyper.items())[:6])
            return text
        if "__class__" in value:
            fields = {k: v for k, v in value.items() if not k.startswith("__")}
            name = value["__class__"]
            return (f"{name.rpartition('.')[2]} object ({name}, kept as data, never imported), {len(fields)} "
                    f"fields{_scalar_fields(fields)}")
        inline = json.dumps(value)
        if len(inline) <= INLINE_JSON:
            return inline
        return f"mapping with {len(value)} keys{_scalar_fields(value)}"
    if isinstance(value, list):
        inline = json.dumps(value)
        return inline if len(inline) <= INLINE_JSON else f"list of {len(value)} items"
    return json.dumps(value)


def _scalar_fields(fields: Mapping) -> str:
    scalars = [(k, v) for k, v in fields.items() if isinstance(v, (bool, int, float, str)) and len(str(v)) <= 40]
    if not scalars:
        return ""
    shown = ", ".join(f"{k}={v!r}" for k, v in scalars[:SCALAR_FIELDS_SHOWN])
    return f": {shown}" + (", ..." if len(scalars) > SCALAR_FIELDS_SHOWN else "")

