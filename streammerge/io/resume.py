"""The resume ledger of a directory output: which files are complete, with a checksum to verify them by.

Each completed file is recorded — its size and a checksum computed while it was written — in
`.streammerge-manifest.json`, with a fingerprint of the recipe and the inputs, so an interrupted run can be
resumed: completed files that still verify are kept, everything else is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

from streammerge.errors import OutputError
from streammerge.io.files import unlink_if_present, write_atomically, write_error

MANIFEST = ".streammerge-manifest.json"
MANIFEST_FORMAT = "streammerge-partial-output-1"
READ_BLOCK = 8 * 1024**2


# -- checksums ------------------------------------------------------------------------------------------------

def combine(crcs: list[int]) -> str:
    """One digest for a file from the crc32 of each of its segments (header, then each tensor in file order)."""
    return "crc32x:" + hashlib.sha256(b"".join(c.to_bytes(4, "little") for c in crcs)).hexdigest()[:32]


def crc_of_range(fd: int, position: int, length: int) -> int:
    crc = 0
    buffer = bytearray(min(READ_BLOCK, max(length, 1)))
    view = memoryview(buffer)
    while length:
        n = os.preadv(fd, [view[:min(length, len(buffer))]], position)
        if n == 0:
            raise EOFError
        crc = zlib.crc32(view[:n], crc)
        position, length = position + n, length - n
    return crc


class FileChecksum:
    """The crc32 of a safetensors file's header and of each tensor's bytes, computed while they are written.

    Tensors may be written in any order; each tensor's pieces are expected in order (the engine writes chunks
    in order). A tensor written otherwise is checksummed from the file when the file is finished. A tensor
    written by another process is accounted for with `record(name, crc)`.
    """

    def __init__(self, header: bytes, offsets: dict[str, int], sizes: dict[str, int]):
        self.header_crc = zlib.crc32(header)
        self.data_start = len(header)
        self.order = sorted(offsets, key=offsets.get)
        self.offsets, self.sizes = offsets, sizes
        self.next = dict.fromkeys(offsets, 0)  # bytes of each tensor written in order so far
        self.written = dict.fromkeys(offsets, 0)
        self.crc = dict.fromkeys(offsets, 0)
        self.in_order = dict.fromkeys(offsets, True)

    def update(self, name: str, byte_offset: int, data) -> bool:
        """Account for `data` written at `byte_offset` within tensor `name`; True when the tensor is complete."""
        n = len(data)
        if self.in_order[name] and byte_offset == self.next[name]:
            self.crc[name] = zlib.crc32(data, self.crc[name])
            self.next[name] += n
        else:
            self.in_order[name] = False
        self.written[name] += n
        return self.written[name] >= self.sizes[name]

    def record(self, name: str, crc: int) -> None:
        """Tensor `name` was written whole elsewhere; `crc` is the crc32 of its bytes."""
        self.crc[name], self.in_order[name] = crc, True
        self.next[name] = self.written[name] = self.sizes[name]

    def digest(self, fd: int) -> str:
        crcs = [self.header_crc]
        for name in self.order:
            if self.in_order[name] and self.next[name] == self.sizes[name]:
                crcs.append(self.crc[name])
            else:
                crcs.append(crc_of_range(fd, self.data_start + self.offsets[name], self.sizes[name]))
        return combine(crcs)


def file_digest(path: Path, header: bytes, offsets: dict[str, int], sizes: dict[str, int]) -> str | None:
    """The digest of an existing file laid out as `header` + tensors; None if it does not start with `header`
    or cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if os.pread(fd, len(header), 0) != header:
            return None
        crcs = [zlib.crc32(header)]
        for name in sorted(offsets, key=offsets.get):
            crcs.append(crc_of_range(fd, len(header) + offsets[name], sizes[name]))
        return combine(crcs)
    except (OSError, EOFError):
        return None
    finally:
        os.close(fd)


# -- the manifest ---------------------------------------------------------------------------------------------

def fingerprint(headers: list[bytes], input_files, seed: int) -> dict:
    """What must be unchanged for completed files to be reusable: the exact file headers (names, shapes,
    dtypes, layout, recipe metadata), the seed, the program version, and each input file's identity."""
    from streammerge import __version__

    digest = hashlib.sha256()
    for header in headers:
        digest.update(len(header).to_bytes(8, "little") + header)
    inputs = []
    for path in input_files:
        st = os.stat(path)
        inputs.append([os.path.realpath(path), st.st_size, st.st_mtime_ns])
    return {"version": __version__, "headers": digest.hexdigest(), "seed": seed, "inputs": inputs}


def explain_difference(old: dict, new: dict) -> str | None:
    """Why a manifest's fingerprint does not match this run, in words; None when it matches."""
    if old == new:
        return None
    try:
        return _difference(old, new)
    except (TypeError, ValueError, AttributeError):
        return "its fingerprint is malformed"


def _difference(old: dict, new: dict) -> str:
    if old.get("version") != new["version"]:
        return f"it was written by streammerge {old.get('version')}, this is {new['version']}"
    old_inputs = {p: (s, m) for p, s, m in old.get("inputs", [])}
    new_inputs = {p: (s, m) for p, s, m in new["inputs"]}
    if set(old_inputs) != set(new_inputs):
        changed = sorted(set(old_inputs) ^ set(new_inputs))
        return f"it merged other input files ({changed[0]}{' and more' if len(changed) > 1 else ''})"
    for p in new_inputs:
        if old_inputs[p] != new_inputs[p]:
            return f"the input {p} changed since (size or modification time)"
    if old.get("headers") != new["headers"]:
        return "the recipe differs (tensors, dtypes, shard size, method or parameters)"
    return "the recipe differs (seed)"


class Manifest:
    def __init__(self, fingerprint: dict, completed: dict | None = None):
        self.fingerprint = fingerprint
        self.completed: dict[str, dict] = dict(completed or {})

    @classmethod
    def load(cls, directory: Path) -> "Manifest | None":
        """The manifest in `directory`; None when absent. An unreadable one is refused (not silently ignored)."""
        path = Path(directory) / MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise OutputError(f"'{path}' (left by an interrupted merge) cannot be read ({exc}); remove it and "
                              "rerun without --resume.") from None
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT \
                or not isinstance(data.get("fingerprint"), dict) or not isinstance(data.get("completed"), dict):
            raise OutputError(f"'{path}' is not a manifest this version of streammerge understands; remove it "
                              "and rerun without --resume.")
        return cls(data["fingerprint"], data["completed"])

    def save(self, directory: Path) -> None:
        data = {"format": MANIFEST_FORMAT, "fingerprint": self.fingerprint, "completed": self.completed}
        write_atomically(Path(directory) / MANIFEST, json.dumps(data, indent=1, sort_keys=True) + "\n")


class ResumeLedger:
    """The manifest of one directory output over a run: what an interrupted run left (`previous`), what this
    run may reuse from it, and each file this run completes."""

    def __init__(self, directory: Path, fingerprint: dict):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.previous: Manifest | None = None
        self.manifest: Manifest | None = None  # this run's record of complete files
        self.resumed = False  # this run continues `previous`

    def load(self, resume: bool) -> None:
        """Read an interrupted run's manifest; with `resume`, refuse one this run cannot continue."""
        self.previous = Manifest.load(self.directory)
        if resume and self.previous is not None:
            why = explain_difference(self.previous.fingerprint, self.fingerprint)
            if why:
                raise OutputError(
                    f"--resume: '{self.directory}' holds an interrupted merge that this one cannot continue: {why}. "
                    "Run without --resume to start over (its partial output is then removed).")

    def start(self, resume: bool) -> bool:
        """Begin this run: continue the previous manifest (True), or remove it (a fresh start). Call after
        the directory is locked."""
        if resume and self.previous is not None:
            self.manifest, self.resumed = Manifest(self.fingerprint), True
            return True
        if self.previous is not None:
            os.unlink(self.directory / MANIFEST)
        return False

    def previous_record(self, name: str):
        return self.previous.completed.get(name) if self.previous is not None else None

    def reuse(self, name: str) -> None:
        """Keep file `name`, completed and verified by the interrupted run."""
        self.manifest.completed[name] = self.previous.completed[name]

    def record(self, name: str, size: int, checksum: str) -> None:
        """File `name` is complete: note it so that a resumed run can keep it."""
        if self.manifest is None:
            self.manifest = Manifest(self.fingerprint)
        self.manifest.completed[name] = {"size": size, "checksum": checksum}
        try:
            self.manifest.save(self.directory)
        except OSError as exc:
            raise write_error(self.directory / MANIFEST, exc) from None

    def finish(self) -> None:
        """The output is complete: the manifest is done with."""
        unlink_if_present(self.directory / MANIFEST)

    def abort(self, reused: list[str]) -> None:
        """Leave the manifest as this run found it: only the files it reused stay recorded."""
        kept = {name: self.manifest.completed[name] for name in reused}
        if self.resumed and kept:
            try:
                Manifest(self.fingerprint, kept).save(self.directory)
            except OSError:
                pass
        elif self.manifest is not None:
            unlink_if_present(self.directory / MANIFEST)
