"""safetensors: a validating, memory-mapping reader and a header-first streaming writer.

Layout: u64 little-endian header length N, N bytes of JSON, then the data area. Every tensor's
`data_offsets` are relative to the data area, which they must cover contiguously from 0 to end of file.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import sys
from pathlib import Path

import torch

from streammerge.errors import CheckpointError, short
from streammerge.io.checkpoint import Checkpoint, is_valid_text, register_format
from streammerge.io.mapped import MappedFile, TensorInfo
from streammerge.io.files import AtomicFile
from streammerge.memory import check_parse_room

MAX_HEADER = 100_000_000
MAX_ELEMENTS = 2**63  # torch sizes are int64

DTYPE_NAMES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPE_NAMES[_name] = getattr(torch, _attr)
NAME_OF_DTYPE = {v: k for k, v in DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return NAME_OF_DTYPE[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors.") from None


JSON_WHITESPACE = b" \t\n\r"


def _sniff(head: bytes, path: Path) -> bool:
    """A plausible header length, then a JSON object (the safetensors library allows whitespace before it)."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    start = head[8:8 + n].lstrip(JSON_WHITESPACE)
    return n > 1 and (start[:1] == b"{" or (not start and len(head) >= 64))


class DuplicateKeyError(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):  # rare: find the repeated key for the message
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(key)
            seen.add(key)
    return out


def loads_strict(text):
    """json.loads that refuses repeated keys (json.loads keeps the last one silently, so a header naming a
    tensor twice would be read as something else than what another reader sees)."""
    return json.loads(text, object_pairs_hook=_refuse_duplicate_keys)


def _numel_capped(shape: list[int]) -> int:
    """The product of `shape`, stopping at MAX_ELEMENTS (a hostile header can list millions of dimensions)."""
    if 0 in shape:
        return 0
    numel = 1
    for d in shape:
        numel *= d
        if numel >= MAX_ELEMENTS:
            return MAX_ELEMENTS
    return numel


def read_header(path: Path, size: int, fd: int, max_ram: int | None = None) -> tuple[dict, int]:
    """Parse and validate the header; returns (header dict, start of the data area)."""
    def bad(what: str, tensor: str | None = None):
        where = f"tensor {short(tensor)}: " if tensor is not None else ""
        return CheckpointError(f"{path}: not a valid safetensors file: {where}{what}. "
                               "The file is truncated or corrupt; re-download or re-export it.")

    if size < 8:
        raise bad(f"the file has {size} bytes, fewer than the 8-byte header length")
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if n > MAX_HEADER:
        raise bad(f"header length {n} exceeds the {MAX_HEADER}-byte limit")
    if 8 + n > size:
        raise bad(f"header length {n} runs past the end of the file ({size} bytes)")
    check_parse_room(path, "header", n, max_ram)
    raw = os.pread(fd, n, 8)
    if len(raw) != n:
        raise bad(f"the header is {n} bytes but only {len(raw)} could be read")
    try:
        header = loads_strict(raw.decode("utf-8"))
    except DuplicateKeyError as exc:
        raise bad(f"the header names {short(exc.args[0])} twice") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise bad(f"header is not valid UTF-8 JSON ({detail})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.get("__metadata__")  # absent or null: no metadata, as the safetensors library reads it
    if meta is None:
        header.pop("__metadata__", None)
    elif not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) and is_valid_text(k)
                                               and is_valid_text(v) for k, v in meta.items()):
        raise bad("__metadata__ must map strings to strings (valid Unicode)")
    data_start = 8 + n
    data_size = size - data_start
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not is_valid_text(name):
            raise bad("the tensor name is not valid Unicode (a lone surrogate)", name)
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad("entry must have exactly dtype, shape and data_offsets", name)
        if not isinstance(entry["dtype"], str) or entry["dtype"] not in DTYPE_NAMES:
            raise bad(f"unknown dtype {short(entry['dtype'])}", name)
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < MAX_ELEMENTS for d in shape):
            raise bad(f"shape {short(shape)} is not a list of non-negative integers below 2**63", name)
        numel = _numel_capped(shape)
        if numel >= MAX_ELEMENTS:
            raise bad(f"shape {short(shape)} has more than 2**63 elements", name)
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
            raise bad(f"data_offsets {short(offsets)} is not [begin, end]", name)
        expected = numel * DTYPE_NAMES[entry["dtype"]].itemsize
        if offsets[1] - offsets[0] != expected:
            raise bad(f"holds {offsets[1] - offsets[0]} bytes but shape {short(shape)} of {entry['dtype']} needs "
                      f"{expected}", name)
        if offsets[1] > data_size:
            raise bad(f"data_offsets {offsets} run past the end of the file ({data_size} bytes of data)", name)
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise bad(f"data starts at {begin}, expected {cursor} (gap or overlap between tensors)", name)
        cursor = end
    if cursor != data_size:
        raise bad(f"tensors cover {cursor} bytes of data but the file has {data_size} after the header")
    return header, data_start


def open_safetensors(path: Path, max_ram: int | None = None, **_options) -> Checkpoint:
    mapped = MappedFile(path)
    try:
        header, data_start = read_header(path, mapped.size, mapped.fd, max_ram)
    except Exception:
        mapped.close()
        raise
    metadata = dict(header.pop("__metadata__", {}))
    # A file may list 100,000s of tensors: one tuple per distinct shape, and names shared with the other models
    # (interned), keep what the records hold small.
    shapes: dict[tuple, tuple] = {}
    tensors = {}
    for name in sorted(header, key=lambda n: header[n]["data_offsets"][0]):
        e = header.pop(name)
        shape = tuple(e["shape"])
        name = sys.intern(name)
        tensors[name] = TensorInfo(name, shapes.setdefault(shape, shape), DTYPE_NAMES[e["dtype"]], mapped,
                                   data_start + e["data_offsets"][0])
    return Checkpoint(path, "safetensors", tensors, metadata, "", [mapped])


register_format("safetensors", _sniff, open_safetensors)


class SafetensorsWriter(AtomicFile):
    """Writes one safetensors file whose tensor list is known up front: the header goes first, then each
    tensor's bytes are written (in any order, in pieces) at their precomputed offsets.

    The file is built under a temporary name in the destination directory and only renamed into place by
    `commit()`, after an fsync; `abort()` removes it. Bytes are deterministic for the same inputs.
    """

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple]], metadata: dict[str, str]):
        super().__init__(path)
        # Largest alignment first, then the given order: every tensor stays aligned to its element size.
        ordered = sorted(entries, key=lambda e: -e[1].itemsize)
        self.offsets: dict[str, int] = {}  # of each tensor's bytes, from the start of the data area
        self.sizes: dict[str, int] = {}
        # The JSON of {"__metadata__": ..., name: {"dtype", "shape", "data_offsets"}, ...} as json.dumps writes
        # it compactly, built a tensor at a time: a dict per tensor would cost far more than the text.
        text = io.StringIO()
        text.write("{")
        if metadata:
            text.write('"__metadata__":' + json.dumps(dict(metadata), separators=(",", ":"), ensure_ascii=False))
        cursor = 0
        for i, (name, dtype, shape) in enumerate(ordered):
            nbytes = math.prod(shape) * dtype.itemsize
            text.write(f'{"," if i or metadata else ""}{json.dumps(name, ensure_ascii=False)}:{{"dtype":"'
                       f'{dtype_name(dtype)}","shape":[{",".join(map(str, shape))}],"data_offsets":'
                       f'[{cursor},{cursor + nbytes}]}}')
            self.offsets[name], self.sizes[name] = cursor, nbytes
            cursor += nbytes
        text.write("}")
        blob = text.getvalue().encode("utf-8")
        del text
        blob += b" " * (-len(blob) % 8)
        self.header = struct.pack("<Q", len(blob)) + blob
        self.data_start = len(self.header)
        self.total_size = self.data_start + cursor

    def position(self, name: str) -> int:
        """Where tensor `name`'s bytes start in the file."""
        return self.data_start + self.offsets[name]

    def open(self) -> None:
        self.create()
        try:
            self.write_at(self.header, 0)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, element_offset: int, chunk: torch.Tensor) -> None:
        """Write a contiguous chunk of tensor `name`, starting at element `element_offset`."""
        data = chunk.contiguous().view(torch.uint8).numpy() if chunk.numel() else b""
        self.write_bytes(name, element_offset * chunk.element_size(), data)

    def write_bytes(self, name: str, byte_offset: int, data) -> None:
        """Write `data` (any buffer) at `byte_offset` within tensor `name`."""
        position = self.position(name) + byte_offset
        self.write_at(data, position)
        self.write_back(position, len(data))

    def copy_tensor(self, source: str, target: str, chunk_bytes: int) -> None:
        """Copy the already-written bytes of `source` to `target` (tied tensors), a chunk at a time."""
        src, dst = self.position(source), self.position(target)
        remaining = self.sizes[source]
        while remaining:
            data = os.pread(self.fd, min(remaining, chunk_bytes), src)
            self.write_at(data, dst)
            src, dst, remaining = src + len(data), dst + len(data), remaining - len(data)
