"""Structural checks of zip-format torch files, before and after torch maps them.

torch's zip reader trusts the archive: a record whose bytes run past the end of the file, a compressed record
(which cannot be memory-mapped) or an enormous pickle record fail late, cryptically, or by exhausting memory.
`check_torch_zip` refuses those up front from the central directory and the local headers alone (no record is
read), and `check_tensors_in_records` makes sure every tensor torch handed back lies inside one record.
"""

from __future__ import annotations

import bisect
import os
import struct
import zipfile
from pathlib import Path

from streammerge.errors import CheckpointError
from streammerge.io.mapped import TensorInfo

LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # zip local file header, 30 bytes; the last two: name, extra lengths
LOCAL_HEADER_SIGNATURE = 0x04034B50
MAX_PICKLE = 256 * 1024**2  # the pickle record is read whole into memory; real ones are a few MB at most
MAX_CENTRAL_DIRECTORY = 64 * 1024**2  # Python holds ~10x this as objects; real ones are well under 1 MB


def local_data_start(f, header_offset: int) -> int | None:
    """Where the data of the record whose local header is at `header_offset` starts; None if there is no
    local header there."""
    f.seek(header_offset)
    raw = f.read(LOCAL_HEADER.size)
    if len(raw) != LOCAL_HEADER.size or LOCAL_HEADER.unpack(raw)[0] != LOCAL_HEADER_SIGNATURE:
        return None
    *_, name_len, extra_len = LOCAL_HEADER.unpack(raw)
    return header_offset + LOCAL_HEADER.size + name_len + extra_len


def _corrupt(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable torch zip checkpoint: {what}. The file is truncated or corrupt; "
                           "re-download or re-save it with torch.save.")


def check_torch_zip(path: Path) -> dict[str, tuple[int, int]]:
    """Validate the archive's structure; returns {record name: (data offset, size)} for every record."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            # zipfile's end-record reader is private but long-stable; without it the bound is just skipped.
            end = getattr(zipfile, "_EndRecData", lambda _f: None)(f)
            directory_size = end[getattr(zipfile, "_ECD_SIZE", 5)] if end else 0
            if directory_size > MAX_CENTRAL_DIRECTORY:
                raise _corrupt(path, f"its central directory claims {directory_size} bytes")
            with zipfile.ZipFile(f) as archive:
                records = archive.infolist()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error,
            UnicodeDecodeError) as exc:
        raise _corrupt(path, f"the zip directory cannot be read ({exc})") from None
    if is_torchscript(record.filename for record in records):
        raise CheckpointError(
            f"{path}: a TorchScript archive (torch.jit.save: a model's compiled code together with its weights), "
            "not a checkpoint of weights; streammerge does not read TorchScript, and nothing in the file was run. "
            "If you trust the file, save its weights as a checkpoint with "
            "torch.save(torch.jit.load(path).state_dict(), 'model.pth') and merge or convert that file.")
    spans: dict[str, tuple[int, int]] = {}
    with open(path, "rb") as f:
        for record in records:
            name = record.filename
            if record.flag_bits & 0x1:
                raise _corrupt(path, f"record '{name}' is encrypted")
            if record.compress_type != zipfile.ZIP_STORED or record.compress_size != record.file_size:
                raise CheckpointError(
                    f"{path}: record '{name}' is compressed, so its tensors cannot be memory-mapped. torch.save "
                    "never compresses; the file was re-zipped by another tool. Unzip and re-zip it with "
                    "`zip -0` (stored), or load and re-save it with torch.save.")
            start = local_data_start(f, record.header_offset)
            if start is None:
                raise _corrupt(path, f"record '{name}' has no local header at offset {record.header_offset}")
            if start + record.file_size > size:
                raise _corrupt(path, f"record '{name}' needs bytes {start}..{start + record.file_size} but the file "
                                     f"has {size}")
            spans[name] = (start, record.file_size)
    pickles = [name for name in spans if name == "data.pkl" or name.endswith("/data.pkl")]
    if not pickles:
        raise _corrupt(path, "it holds no data.pkl record")
    largest = max(spans[name][1] for name in pickles)
    if largest > MAX_PICKLE:
        raise CheckpointError(f"{path}: its pickle record is {largest} bytes (limit {MAX_PICKLE}); a checkpoint "
                              "whose non-tensor data is that large is corrupt or not a checkpoint.")
    return spans


def is_torchscript(names) -> bool:
    """torch.jit.save archives hold the model's code (`<name>/code/...`, deflated) and `<name>/constants.pkl`
    beside data.pkl; torch.save archives hold neither."""
    return any(name.endswith("/constants.pkl") or name.split("/")[1:2] == ["code"] for name in names)


def check_tensors_in_records(path: Path, tensors, spans: dict[str, tuple[int, int]]) -> None:
    """Refuse a tensor whose bytes do not lie inside one record of the archive (a record shorter than its
    tensor claims would otherwise read the neighbouring records' bytes)."""
    ordered = sorted((start, start + length, name) for name, (start, length) in spans.items())
    starts = [s for s, _, _ in ordered]
    info: TensorInfo
    for info in tensors:
        offset, nbytes = info.span
        if nbytes == 0:
            continue
        i = bisect.bisect_right(starts, offset) - 1
        if i < 0 or offset + nbytes > ordered[i][1]:
            where = (f"record '{ordered[i][2]}' holds bytes {ordered[i][0]}..{ordered[i][1]}" if i >= 0
                     else "no record holds them")
            raise _corrupt(path, f"tensor '{info.name}' needs bytes {offset}..{offset + nbytes} but {where}")


def check_storages_match_records(path: Path, state_dict: dict, tensors: dict[str, TensorInfo],
                                 spans: dict[str, tuple[int, int]]) -> None:
    """Each tensor's storage must be exactly one record: torch's memory-mapped load does not compare the size
    the pickle declares for a storage with the size of its record (its ordinary load refuses a mismatch)."""
    records = {start: (length, name) for name, (start, length) in spans.items()}
    for name, tensor in state_dict.items():
        nbytes = tensor.untyped_storage().nbytes()
        if nbytes == 0 or name not in tensors:
            continue
        start = tensors[name].offset - tensor.storage_offset() * tensor.element_size()
        length, record = records.get(start, (None, None))
        if length != nbytes:
            where = f"its record '{record}' holds {length}" if record else "no record starts where it does"
            raise _corrupt(path, f"tensor '{name}' has a storage of {nbytes} bytes but {where}")
