"""A streaming writer for torch's zip checkpoint format: the file `torch.save` writes, built without ever holding
the tensors in memory.

Every record's size is known before any data is read (the pickle is small and built from shapes; each storage's
size follows from its shape and dtype), so the whole layout is computed up front, like the header-first
safetensors writer. Storage bytes are then written chunk by chunk at their precomputed offsets, with each record's
CRC-32 computed as the bytes go by; CRCs land in the data descriptors and the central directory at commit.

The layout copies what torch 2.x (miniz) writes, byte for byte in structure, so that every reader torch has
accepts it, including the opt-in path that computes storage offsets without reading local headers:
records `data.pkl`, `.format_version`, `.storage_alignment`, `byteorder`, `data/0..N-1`, `version`,
`.data/serialization_id` under one top-level folder; each stored uncompressed, its data aligned to 64 bytes by
an `FB` padding extra field, followed by a data descriptor (flag bit 3) unless empty; ZIP64 fields where a size
or offset reaches 4 GiB; a ZIP64 end record always.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

from streammerge.io.files import AtomicFile, write_error
from streammerge.io.zip_check import LOCAL_HEADER, LOCAL_HEADER_SIGNATURE

ALIGNMENT = 64
ARCHIVE = "archive"  # torch.save names the top-level folder after the file; any name loads, this one is stable
MAX32 = 0xFFFFFFFF  # a 32-bit field holding this means: see the ZIP64 field
ZIP64_LIMIT = MAX32  # sizes and offsets from here on need ZIP64 fields (tests lower it)
FORMAT_VERSION = b"1"
RECORD_VERSION = b"3\n"

CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes
DESCRIPTOR32 = struct.Struct("<IIII")
DESCRIPTOR64 = struct.Struct("<IIQQ")
ZIP64_END = struct.Struct("<IQHHIIQQQQ")  # 56 bytes
ZIP64_LOCATOR = struct.Struct("<IIQI")  # 20 bytes
END = struct.Struct("<IHHHHIIH")  # 22 bytes
FLAG_DESCRIPTOR, FLAG_UTF8 = 0x0008, 0x0800
DOS_DATE = 0  # as torch.save writes it (no timestamp), so equal inputs give equal files
SERIALIZATION_ID_DIGITS = 40


@dataclass
class Record:
    name: str  # full name inside the archive
    size: int
    header_offset: int
    payload: bytes | None = None  # content known up front; None: streamed storage bytes
    crc: int = 0
    crc_covered: int = 0  # bytes [0, crc_covered) are folded into `crc`
    crc_in_order: bool = True  # False once a write arrived out of order: recompute at commit

    @property
    def size_is_64(self) -> bool:
        return self.size >= ZIP64_LIMIT

    @property
    def offset_is_64(self) -> bool:
        return self.header_offset >= ZIP64_LIMIT

    @property
    def zip64_extra(self) -> bytes:
        values = ([self.size, self.size] if self.size_is_64 else []) + ([self.header_offset] if self.offset_is_64
                                                                          else [])
        return struct.pack(f"<HH{len(values)}Q", 0x0001, 8 * len(values), *values) if values else b""

    @property
    def padding(self) -> int:
        """Bytes of the `FB` extra field that aligns the data (its 4-byte header included), as torch computes."""
        start = self.header_offset + LOCAL_HEADER.size + len(self.name.encode()) + 4 + len(self.zip64_extra)
        return 4 + (-start % ALIGNMENT)

    @property
    def data_offset(self) -> int:
        return self.header_offset + LOCAL_HEADER.size + len(self.name.encode()) + len(self.zip64_extra) + self.padding

    @property
    def descriptor_size(self) -> int:
        if self.size == 0:
            return 0
        return DESCRIPTOR64.size if (self.size_is_64 or self.offset_is_64) else DESCRIPTOR32.size

    @property
    def end(self) -> int:
        return self.data_offset + self.size + self.descriptor_size

    @property
    def flags(self) -> int:
        return FLAG_UTF8 | (FLAG_DESCRIPTOR if self.size else 0)

    def local_header(self) -> bytes:
        name = self.name.encode()
        pad = self.padding - 4
        extra = self.zip64_extra + struct.pack("<2sH", b"FB", pad) + b"Z" * pad
        # CRC and sizes are zero here: they follow the data in the descriptor (flag bit 3), as miniz writes them.
        header = LOCAL_HEADER.pack(LOCAL_HEADER_SIGNATURE, 0, self.flags, 0, 0, DOS_DATE, 0, 0, 0, len(name), len(extra))
        return header + name + extra

    def descriptor(self) -> bytes:
        if self.descriptor_size == DESCRIPTOR64.size:
            return DESCRIPTOR64.pack(0x08074B50, self.crc, self.size, self.size)
        if self.descriptor_size:
            return DESCRIPTOR32.pack(0x08074B50, self.crc, self.size, self.size)
        return b""

    def central_header(self) -> bytes:
        name = self.name.encode()
        size32 = MAX32 if self.size_is_64 else self.size
        offset32 = MAX32 if self.offset_is_64 else self.header_offset
        extra = self.zip64_extra
        return CENTRAL_HEADER.pack(0x02014B50, 0, 0, self.flags, 0, 0, DOS_DATE, self.crc, size32, size32, len(name),
                                   len(extra), 0, 0, 0, 0, offset32) + name + extra

    @property
    def central_size(self) -> int:
        return CENTRAL_HEADER.size + len(self.name.encode()) + len(self.zip64_extra)


class TorchZipWriter(AtomicFile):
    """Writes one torch zip checkpoint whose pickle and storage sizes are known up front.

    `storage_sizes[i]` is the byte size of `data/i`; write its bytes with `write(i, byte_offset, data)` in any
    order and any pieces (in order is cheapest: the CRC is then computed on the fly). The file is built under a
    temporary name next to `path` and renamed into place by `commit()` after an fsync; `abort()` removes it.
    """

    def __init__(self, path: Path, pickle_bytes: bytes, storage_sizes: list[int]):
        super().__init__(path)
        self.records: list[Record] = []
        cursor = 0

        def add(name: str, size: int, payload: bytes | None = None) -> Record:
            nonlocal cursor
            record = Record(f"{ARCHIVE}/{name}", size, cursor, payload)
            if payload is not None:
                record.crc, record.crc_covered = zlib.crc32(payload), size
            self.records.append(record)
            cursor = record.end
            return record

        add("data.pkl", len(pickle_bytes), pickle_bytes)
        add(".format_version", len(FORMAT_VERSION), FORMAT_VERSION)
        alignment = str(ALIGNMENT).encode()
        add(".storage_alignment", len(alignment), alignment)
        byteorder = sys.byteorder.encode()
        add("byteorder", len(byteorder), byteorder)
        self.storages = [add(f"data/{i}", size) for i, size in enumerate(storage_sizes)]
        add("version", len(RECORD_VERSION), RECORD_VERSION)
        # Derived from the records' names and CRCs at commit (like torch's), so its bytes are filled in then.
        self.serialization_id = add(".data/serialization_id", SERIALIZATION_ID_DIGITS)
        self.central_offset = cursor
        self.central_size = sum(r.central_size for r in self.records)
        self.total_size = self.central_offset + self.central_size + ZIP64_END.size + ZIP64_LOCATOR.size + END.size

    # -- writing -------------------------------------------------------------------------------------------
    def open(self) -> None:
        self.create()
        try:
            for record in self.records:
                self.write_at(record.local_header(), record.header_offset)
                if record.payload is not None:
                    self.write_at(record.payload, record.data_offset)
        except BaseException:
            self.abort()
            raise

    def write(self, index: int, byte_offset: int, data) -> None:
        """Write `data` (any buffer) at `byte_offset` inside storage `index`."""
        record = self.storages[index]
        view = memoryview(data).cast("B")
        if byte_offset < 0 or byte_offset + len(view) > record.size:
            raise ValueError(f"write of {len(view)} bytes at {byte_offset} overflows {record.name} "
                             f"({record.size} bytes)")
        self.write_at(view, record.data_offset + byte_offset)
        self.write_back(record.data_offset + byte_offset, len(view))
        if record.crc_in_order and byte_offset == record.crc_covered:
            record.crc = zlib.crc32(view, record.crc)
            record.crc_covered += len(view)
        else:
            record.crc_in_order = False

    def record_crc(self, index: int, crc: int) -> None:
        """Storage `index` was written whole elsewhere (another process); `crc` is the crc32 of its bytes."""
        record = self.storages[index]
        record.crc, record.crc_covered, record.crc_in_order = crc, record.size, True

    def copy(self, source: int, target: int, chunk_bytes: int) -> None:
        """Copy the already-written bytes of storage `source` into storage `target` (same size)."""
        src = self.storages[source]
        done = 0
        while done < src.size:
            data = os.pread(self.fd, min(src.size - done, chunk_bytes), src.data_offset + done)
            if not data:
                raise OSError(f"{self.tmp_path}: short read while copying {src.name}")
            self.write(target, done, data)
            done += len(data)

    # -- finishing -----------------------------------------------------------------------------------------
    def _finish_crc(self, record: Record, chunk_bytes: int = 16 * 2**20) -> None:
        if record.crc_in_order and record.crc_covered == record.size:
            return
        crc, done = 0, 0
        while done < record.size:
            data = os.pread(self.fd, min(record.size - done, chunk_bytes), record.data_offset + done)
            if not data:  # never written: the file is shorter, those bytes read as zeros
                data = bytes(min(record.size - done, chunk_bytes))
            crc = zlib.crc32(data, crc)
            done += len(data)
        record.crc, record.crc_covered, record.crc_in_order = crc, record.size, True

    def _serialization_id(self) -> bytes:
        digest = hashlib.sha256()
        for record in self.records:
            if record is not self.serialization_id:
                digest.update(f"{record.name}\0{record.size}\0{record.crc}\n".encode())
        raw = digest.digest()
        high, low = (int.from_bytes(raw[i:i + 8], "little") % 10**20 for i in (0, 8))
        return f"{high:020d}{low:020d}".encode()

    def trailer(self) -> bytes:
        """Central directory, ZIP64 end record and locator, end record."""
        count = len(self.records)
        central = b"".join(r.central_header() for r in self.records)
        zip64_end_offset = self.central_offset + self.central_size
        zip64_end = ZIP64_END.pack(0x06064B50, ZIP64_END.size - 12, 0x031E, 45, 0, 0, count, count,
                                   self.central_size, self.central_offset)
        locator = ZIP64_LOCATOR.pack(0x07064B50, 0, zip64_end_offset, 1)
        large = self.central_offset >= ZIP64_LIMIT or self.central_size >= ZIP64_LIMIT
        end = END.pack(0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                       MAX32 if large else self.central_size, MAX32 if large else self.central_offset, 0)
        return central + zip64_end + locator + end

    def commit(self) -> None:
        for record in self.storages:
            self._finish_crc(record)
        sid = self._serialization_id()
        self.serialization_id.payload = sid
        self.serialization_id.crc = zlib.crc32(sid)
        self.write_at(sid, self.serialization_id.data_offset)
        for record in self.records:
            self.write_at(record.descriptor(), record.data_offset + record.size)
        self.write_at(self.trailer(), self.central_offset)
        try:
            os.ftruncate(self.fd, self.total_size)
        except OSError as exc:
            raise write_error(self.path, exc) from None
        super().commit()

