"""Zip-format torch files (.pth, .pt, .bin, .ckpt).

First path: torch.load(mmap=True, weights_only=True). torch maps the file lazily; we only use its result to
learn each tensor's shape, dtype, strides and where its bytes sit in the file (the storage's address inside
torch's mapping, translated back to a file offset through /proc/self/maps).

When weights_only refuses the file because its pickle holds other objects (a pickled config class, numpy
values, argparse.Namespace, ...) or torch fails to read it otherwise, the restricted unpickler
(safe_pickle.py) reads `data.pkl` instead: it executes nothing, keeps unknown objects as inert records and
describes tensors without reading them. Each storage `<archive>/data/<key>` is stored uncompressed, so its
bytes start right after the member's local header; the tensors are mapped there.

Either way, reading then goes through our own mapping, like every other format.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import torch

from streammerge.errors import CheckpointError
from streammerge.io.checkpoint import Checkpoint, register_format
from streammerge.io.containers import checkpoint_from_pickle, find_state_dict, to_jsonable
from streammerge.io.mapped import MappedFile, TensorInfo, check_span
from streammerge.io.safe_pickle import StorageRecord, restricted_load, storage_pid
from streammerge.io.zip_check import (check_storages_match_records, check_tensors_in_records, check_torch_zip,
                                     local_data_start)
from streammerge.memory import PICKLE_WORST_BYTES_PER_BYTE, MemoryCheckedFile, check_parse_room, parse_fits



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


class TorchLoadFailed(Exception):
    """torch.load(mmap=True, weights_only=True) did not read the file (refused objects, or anything else)."""


def load_torch_zip(path: Path):
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise TorchLoadFailed(str(exc)) from None


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


# ---------------------------------------------------------------------------------------------------------------
# The restricted path

def _archive_prefix(zf: zipfile.ZipFile, path: Path) -> str:
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointError(f"{path}: a zip file but not a torch checkpoint (expected one '<name>/data.pkl', "
                              f"found {len(pickles)}). Re-save it with torch.save.")
    return pickles[0][: -len("data.pkl")]


def member_data_offset(f, info: zipfile.ZipInfo, path: Path) -> int:
    """Byte offset where a stored (uncompressed) member's data starts in the file."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{path}: zip member '{info.filename}' is compressed; torch.save never compresses "
                              "tensor data, so the file was repacked. Re-save it with torch.save.")
    start = local_data_start(f, info.header_offset)
    if start is None:
        raise CheckpointError(f"{path}: zip member '{info.filename}' has no valid local header; the file is corrupt.")
    return start


def read_torch_zip_restricted(path: Path, max_ram: int | None = None) -> tuple[object, dict[str, int]]:
    """(the unpickled object with TensorRecords and inert records, storage key -> data offset in the file); the
    process's memory is checked against `max_ram` while the pickle is unpickled."""
    storages: dict[str, StorageRecord] = {}
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
            prefix = _archive_prefix(zf, path)
            if prefix + "byteorder" in zf.namelist():
                order = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
                if order != "little":
                    raise CheckpointError(f"{path}: tensors are stored {order}-endian; streammerge reads "
                                          "little-endian files only. Re-save the file on a little-endian machine.")
            pickled = MemoryCheckedFile(io.BytesIO(zf.read(prefix + "data.pkl")), path, "pickle", max_ram)
            obj = restricted_load(pickled, path, lambda pid: storage_pid(path, pid, storages))
            offsets = {}
            for key, storage in storages.items():
                try:
                    member = zf.getinfo(f"{prefix}data/{key}")
                except KeyError:
                    raise CheckpointError(f"{path}: the pickle refers to storage '{key}' but the zip has no "
                                          f"'{prefix}data/{key}'; the file is truncated or corrupt.") from None
                if storage.nbytes > member.file_size:
                    raise CheckpointError(f"{path}: storage '{key}' needs {storage.nbytes} bytes but its zip "
                                          f"member holds {member.file_size}; the file is corrupt.")
                offsets[key] = member_data_offset(f, member, path)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a readable torch zip checkpoint ({exc}). "
                              "The file is truncated or corrupt; re-download or re-save it.") from None
    return obj, offsets


def open_torch_zip_restricted(path: Path, state_dict_key: str | None = None, max_ram: int | None = None,
                              records: dict[str, tuple[int, int]] | None = None) -> Checkpoint:
    records = check_torch_zip(path) if records is None else records
    obj, offsets = read_torch_zip_restricted(path, max_ram)
    checkpoint = checkpoint_from_pickle(path, "torch-zip", obj, offsets, state_dict_key)
    try:
        check_tensors_in_records(path, checkpoint.tensors.values(), records)
    except Exception:
        checkpoint.close()
        raise
    return checkpoint


def open_torch_zip(path: Path, state_dict_key: str | None = None, max_ram: int | None = None,
                   **_options) -> Checkpoint:
    records = check_torch_zip(path)  # the archive's structure, before torch or the unpickler sees it
    pickle_size = max((size for name, (_, size) in records.items() if name.endswith("/data.pkl")), default=0)
    check_parse_room(path, "pickle", pickle_size, max_ram)  # what unpickling builds, before it is built
    if not parse_fits(pickle_size, max_ram, PICKLE_WORST_BYTES_PER_BYTE):
        # torch's unpickler cannot be stopped at the budget: such a pickle is read where memory is watched.
        return open_torch_zip_restricted(path, state_dict_key, max_ram, records)
    try:
        loaded = load_torch_zip(path)
    except TorchLoadFailed:  # objects weights_only refuses, or a damaged file: the restricted path says which
        return open_torch_zip_restricted(path, state_dict_key, max_ram, records)
    state_dict, container, rest = find_state_dict(loaded, path, state_dict_key)
    mapped = MappedFile(path)
    try:
        tensors = tensors_from_loaded(path, state_dict, mapped)
        check_storages_match_records(path, state_dict, tensors, records)
        check_tensors_in_records(path, tensors.values(), records)
    except Exception:
        mapped.close()
        raise
    return Checkpoint(path, "torch-zip", tensors, to_jsonable(rest), container, [mapped])


register_format("torch-zip", _sniff, open_torch_zip)
