"""Legacy (pre-1.6, non-zip) torch files: `torch.save(obj, f, _use_new_zipfile_serialization=False)`.

Layout, one after another: four pickles (the magic number, the protocol version 1001, a sys_info dict, then
the object itself, whose tensors refer to storages by key through persistent ids), a fifth pickle listing the
storage keys in the order their data follows, and then each storage as an 8-byte little-endian element count
followed by its raw bytes. torch cannot map such a file, so torch.load reads it whole; here only the pickles
and the 8-byte counts are read (through the restricted unpickler, which executes nothing), and the tensors
are mapped at the offsets found.
"""

from __future__ import annotations

import struct
from pathlib import Path

from streammerge.errors import CheckpointError
from streammerge.io.checkpoint import Checkpoint, register_format
from streammerge.io.containers import checkpoint_from_pickle
from streammerge.io.safe_pickle import StorageRecord, restricted_load, storage_pid
from streammerge.memory import MemoryCheckedFile

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
# The magic number as pickle writes it: LONG1 opcode, 10 bytes, little-endian.
MAGIC_PICKLED = b"\x8a\x0a" + MAGIC_NUMBER.to_bytes(10, "little")


def _sniff(head: bytes, path: Path) -> bool:
    """A pickle (PROTO 2..5) whose first value is torch's magic number (after a FRAME for protocol 4+)."""
    return len(head) >= 14 and head[0] == 0x80 and 2 <= head[1] <= 5 and MAGIC_PICKLED in head[2:24]


def read_torch_legacy(path: Path, max_ram: int | None = None) -> tuple[object, dict[str, int]]:
    """(the unpickled object with TensorRecords, storage key -> data offset in the file). The pickles come first
    and their size is known only once read, so the process's memory is checked against `max_ram` as they are."""
    storages: dict[str, StorageRecord] = {}
    try:
        with open(path, "rb") as raw_file:
            size = raw_file.seek(0, 2)
            raw_file.seek(0)
            f = MemoryCheckedFile(raw_file, path, "pickle", max_ram)
            if restricted_load(f, path) != MAGIC_NUMBER:
                raise CheckpointError(f"{path}: not a legacy torch checkpoint (wrong magic number).")
            version = restricted_load(f, path)
            if version != PROTOCOL_VERSION:
                raise CheckpointError(f"{path}: legacy torch file of protocol version {version!r}; streammerge "
                                      f"reads version {PROTOCOL_VERSION}. Re-save it with a recent torch.save.")
            sys_info = restricted_load(f, path)
            if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
                raise CheckpointError(f"{path}: tensors are stored big-endian; streammerge reads little-endian "
                                      "files only. Re-save the file on a little-endian machine.")
            obj = restricted_load(f, path, lambda pid: storage_pid(path, pid, storages))
            keys = restricted_load(f, path)
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise CheckpointError(f"{path}: the legacy storage list is malformed; the file is corrupt.")
            offsets, position = {}, raw_file.tell()
            for key in keys:
                raw_file.seek(position)
                raw = raw_file.read(8)
                if len(raw) != 8:
                    raise CheckpointError(f"{path}: the file ends before storage '{key}'; it is truncated. "
                                          "Re-download or re-save it.")
                (count,) = struct.unpack("<q", raw)
                storage = storages.get(key)
                if storage is None:
                    raise CheckpointError(f"{path}: storage '{key}' is listed but no tensor refers to it, so "
                                          "its element size is unknown; the file is corrupt.")
                nbytes = count * storage.dtype.itemsize
                if count < 0 or nbytes < storage.nbytes or position + 8 + nbytes > size:
                    raise CheckpointError(f"{path}: storage '{key}' claims {count} elements, which does not fit "
                                          "the file; it is truncated or corrupt. Re-download or re-save it.")
                offsets[key] = position + 8
                position += 8 + nbytes
            missing = [k for k in storages if k not in offsets]
            if missing:
                raise CheckpointError(f"{path}: storage '{missing[0]}' is used by a tensor but not stored in the "
                                      "file; it is truncated or corrupt.")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc}).") from None
    return obj, offsets


def open_torch_legacy(path: Path, state_dict_key: str | None = None, max_ram: int | None = None,
                      **_options) -> Checkpoint:
    obj, offsets = read_torch_legacy(path, max_ram)
    return checkpoint_from_pickle(path, "torch-legacy", obj, offsets, state_dict_key)


register_format("torch-legacy", _sniff, open_torch_legacy)
