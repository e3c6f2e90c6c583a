"""Zip-format torch files (.pth, .pt, .bin, .ckpt) via torch.load(mmap=True, weights_only=True).

torch maps the file lazily; we only use its result to learn each tensor's shape, dtype, strides and where its
bytes sit in the file (the storage's address inside torch's mapping, translated back to a file offset through
/proc/self/maps). Reading then goes through our own mapping, like every other format.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from streammerge.errors import CheckpointError
from streammerge.io.checkpoint import Checkpoint, register_format
from streammerge.io.containers import find_state_dict, to_jsonable
from streammerge.io.mapped import MappedFile, TensorInfo, check_span


def _sniff(head: bytes, path: Path) -> bool:
    return head[:4] == b"PK\x03\x04"


def file_mappings(path: Path) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of every region of this process mapping `path`."""
    st = os.stat(path)
    regions = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or int(parts[4]) != st.st_ino:
                continue
            major, minor = (int(x, 16) for x in parts[3].split(":"))
            if os.makedev(major, minor) != st.st_dev:
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            regions.append((start, end, int(parts[2], 16)))
    return regions


def _file_offset(address: int, regions, path: Path, name: str) -> int:
    for start, end, offset in regions:
        if start <= address < end:
            return address - start + offset
    raise CheckpointError(f"{path}: tensor '{name}' is not backed by the file (torch did not map it); "
                          "re-save the checkpoint with a recent torch.save.")


def load_torch_zip(path: Path):
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: the checkpoint's pickle holds objects that safe loading refuses ({first}). "
            "streammerge never executes pickled code; re-save the file with only tensors and plain data.") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable torch zip checkpoint ({exc}). "
                              "The file is truncated or corrupt; re-download or re-save it.") from None


def tensors_from_loaded(path: Path, state_dict: dict, mapped: MappedFile) -> dict[str, TensorInfo]:
    """TensorInfo for each tensor torch mapped, in file order."""
    regions = file_mappings(path)
    infos = []
    for name, t in state_dict.items():
        if t.numel() == 0:
            offset = 0
        else:
            offset = _file_offset(t.untyped_storage().data_ptr(), regions, path, name)
            offset += t.storage_offset() * t.element_size()
        stride = None if t.is_contiguous() else tuple(t.stride())
        info = TensorInfo(name, tuple(t.shape), t.dtype, mapped, offset, stride)
        check_span(info)
        infos.append(info)
    infos.sort(key=lambda i: i.offset)
    return {i.name: i for i in infos}


def open_torch_zip(path: Path, state_dict_key: str | None = None, **_options) -> Checkpoint:
    loaded = load_torch_zip(path)
    state_dict, container, rest = find_state_dict(loaded, path, state_dict_key)
    mapped = MappedFile(path)
    try:
        tensors = tensors_from_loaded(path, state_dict, mapped)
    except Exception:
        mapped.close()
        raise
    return Checkpoint(path, "torch-zip", tensors, to_jsonable(rest), container, [mapped])


register_format("torch-zip", _sniff, open_torch_zip)
