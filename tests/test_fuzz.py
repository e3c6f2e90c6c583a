"""Fuzzing every input surface: configs (YAML and JSON), safetensors headers, shard indexes, zip and legacy
torch pickles, and the metadata built from pickles; mutated, truncated, random and hostile (aliases, shared
references) inputs thrown at `load_config` and at `open_checkpoint` + reading every tensor.

The property: a clean StreamMergeError, or a result equal to what the reference library reads from the same
bytes — never another exception, a crash, a hang (SECONDS_PER_EXAMPLE each), or memory growth beyond
MEMORY_BOUND per example. Where a memory cgroup can be made, the whole module also runs inside one of
CGROUP_LIMIT, so a runaway allocation is stopped by the kernel rather than by the machine running out. Example
counts are kept small for the test suite; set STREAMMERGE_FUZZ_EXAMPLES=2000 for a longer hunt.
"""

from __future__ import annotations

import copy
import faulthandler
import io
import json
import os
import pickle
import signal
import struct
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from cgroups import confine_this_process
from streammerge.config import load_config
from streammerge.errors import ConfigError, StreamMergeError
from streammerge.io import open_checkpoint
from streammerge.io.containers import MAX_METADATA_CHARS, MAX_METADATA_VALUES, plain_config
from streammerge.memory import MemoryGuard, anon_rss

EXAMPLES = int(os.environ.get("STREAMMERGE_FUZZ_EXAMPLES", "0")) or None
SECONDS_PER_EXAMPLE = 20
MEMORY_BOUND = 256 * 1024**2
CGROUP_LIMIT = 1024**3


def fuzz_settings(examples: int):
    return settings(max_examples=EXAMPLES or examples, deadline=None, derandomize=EXAMPLES is None,
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- samples to mutate -------------------------------------------------------------------------------------------

def _sample_safetensors() -> bytes:
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen).to(torch.bfloat16),
               "c": torch.tensor([7, -8]), "d": torch.zeros(0, 3, dtype=torch.float16),
               "e": torch.arange(7, dtype=torch.uint8), "f": torch.tensor([True, False, True])}
    with tempfile.TemporaryDirectory() as d:
        save_file(tensors, f"{d}/s.safetensors", metadata={"format": "pt"})
        return Path(f"{d}/s.safetensors").read_bytes()


def _sample_torch_zip() -> bytes:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, generator=gen)
    model = {"w": w, "wt": w.t(), "row": w[2], "steps": torch.arange(3), "h": torch.randn(5, generator=gen).half()}
    buffer = io.BytesIO()
    torch.save({"model": model, "step": 3, "config": {"lr": 0.1, "name": "x"}}, buffer)
    return buffer.getvalue()


SAFETENSORS = _sample_safetensors()
HEADER_LENGTH = struct.unpack("<Q", SAFETENSORS[:8])[0]
HEADER = json.loads(SAFETENSORS[8:8 + HEADER_LENGTH])
DATA = SAFETENSORS[8 + HEADER_LENGTH:]
TORCH_ZIP = _sample_torch_zip()
with zipfile.ZipFile(io.BytesIO(TORCH_ZIP)) as _z:
    PICKLE_RECORD = next(n for n in _z.namelist() if n.endswith("data.pkl"))
    PICKLE = _z.read(PICKLE_RECORD)


def rezip(replace: dict[str, bytes | None]) -> bytes:
    """The sample torch zip with some records replaced (None: removed), stored like torch.save does."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(TORCH_ZIP)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = replace.get(info.filename, src.read(info.filename))
            if data is not None:
                dst.writestr(info.filename, data)
    return out.getvalue()


# -- the property ------------------------------------------------------------------------------------------------

class Hang(Exception):
    pass


def _alarm(_signum, _frame):
    raise Hang(f"no answer within {SECONDS_PER_EXAMPLE} s")


@pytest.fixture(scope="module", autouse=True)
def watchdogs():
    """A Python-level timeout per example (SIGALRM) and a hard one for hangs in C code (faulthandler)."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    faulthandler.dump_traceback_later(30 * 60, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module", autouse=True)
def memory_cgroup_for_the_module():
    with confine_this_process(CGROUP_LIMIT) as confined:
        yield confined


def bounded(action):
    """Run `action()` under the per-example time and memory bounds; returns its result."""
    before = anon_rss()
    signal.alarm(SECONDS_PER_EXAMPLE)
    try:
        with MemoryGuard(1 << 62) as guard:
            result = action()
    finally:
        signal.alarm(0)
    assert guard.peak - before < MEMORY_BOUND, f"memory grew by {(guard.peak - before) >> 20} MiB"
    return result


def read_everything(blob: bytes, name: str) -> str:
    """Open `blob` as a checkpoint and read every tensor; returns 'refused' or 'read'."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(blob)
        before = anon_rss()
        signal.alarm(SECONDS_PER_EXAMPLE)
        try:
            with MemoryGuard(1 << 62) as guard:
                try:
                    with open_checkpoint(path) as checkpoint:
                        values = {n: info.read().clone().reshape(info.shape) for n, info in checkpoint.tensors.items()}
                        container = checkpoint.container
                        fmt = checkpoint.format
                except StreamMergeError as exc:
                    assert str(path) in str(exc), exc  # the message names the file
                    return "refused"
        finally:
            signal.alarm(0)
        assert guard.peak - before < MEMORY_BOUND, f"memory grew by {(guard.peak - before) >> 20} MiB"
        compare_with_reference(path, fmt, container, values)
        return "read"


def compare_with_reference(path: Path, fmt: str, container: str, values: dict) -> None:
    """What we accept, the reference library reads the same way."""
    if fmt == "safetensors":
        reference = load_file(path)
    elif fmt == "torch-zip":
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001
            # torch refuses pickled objects the restricted unpickler reads inertly, and damaged records it does
            # not need (version, byteorder, alignment): nothing to compare with then.
            return
        for part in filter(None, container.split(".")):
            loaded = loaded[part]
        reference = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    else:
        return
    assert sorted(values) == sorted(reference)
    for name, tensor in values.items():
        assert same_bytes(tensor, reference[name]), name


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bit pattern (NaN payloads included; bools by value, as readers may normalise
    bytes other than 0 and 1)."""
    if a.dtype == torch.bool:
        return b.dtype == torch.bool and a.shape == b.shape and torch.equal(a, b)
    raw = [t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in (a, b)]
    return a.dtype == b.dtype and a.shape == b.shape and raw[0] == raw[1]


# -- strategies --------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, 2, 4, 12, 16, 2**63, -1])
    | st.floats(allow_nan=True) | st.text(max_size=6) | st.sampled_from(["F32", "BF16", "I64", "U8", "BOOL"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
TENSOR_NAMES = [n for n in HEADER if n != "__metadata__"]


@st.composite
def mutated_headers(draw) -> bytes:
    header = copy.deepcopy(HEADER)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(TENSOR_NAMES))
        action = draw(st.sampled_from(["value", "offset", "shape", "dtype", "drop", "add", "metadata", "entry"]))
        entry = header.get(name)
        if action == "value" and isinstance(entry, dict):
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(json_values)
        elif action == "offset" and isinstance(entry, dict):
            entry["data_offsets"] = [draw(st.integers(-2, len(DATA) + 40)), draw(st.integers(-2, len(DATA) + 40))]
        elif action == "shape" and isinstance(entry, dict):
            entry["shape"] = draw(st.lists(st.integers(-1, 2**33) | st.sampled_from([0, 1, 2, 3, 2**31]),
                                           max_size=5))
        elif action == "dtype" and isinstance(entry, dict):
            entry["dtype"] = draw(st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "I64", "U8", "BOOL",
                                                   "F8_E4M3", "C64", "f32", ""]))
        elif action == "drop":
            header.pop(name, None)
        elif action == "add":
            header[draw(st.text(max_size=4))] = draw(json_values)
        elif action == "metadata":
            header["__metadata__"] = draw(json_values)
        else:
            header[name] = draw(json_values)
    blob = json.dumps(header).encode()
    blob += b" " * draw(st.integers(0, 9))
    length = len(blob) + draw(st.sampled_from([0, 0, 0, -1, 1, 8, -8, 2**40]))
    data = DATA[:draw(st.integers(0, len(DATA)))] if draw(st.booleans()) else DATA
    return struct.pack("<Q", max(0, length)) + blob + data


@st.composite
def flipped(draw, blob: bytes, focus: int | None = None) -> bytes:
    """`blob` with a few bytes overwritten (most of them within the first `focus` bytes when given)."""
    data = bytearray(blob)
    for _ in range(draw(st.integers(1, 6))):
        limit = focus if (focus and draw(st.booleans())) else len(data)
        data[draw(st.integers(0, limit - 1))] = draw(st.integers(0, 255))
    return bytes(data)


random_objects = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)

PREFIXES = [b"", b"PK\x03\x04", b"PK\x05\x06", struct.pack("<Q", 64) + b"{", struct.pack("<Q", 2**62) + b"{",
            b"\x80\x02", b"\x80\x04\x95", b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."]


# -- the tests ----------------------------------------------------------------------------------------------------

@fuzz_settings(50)
@given(mutated_headers())
def test_mutated_safetensors_headers(blob):
    read_everything(blob, "model.safetensors")


@fuzz_settings(30)
@given(st.one_of(st.integers(0, len(SAFETENSORS)).map(lambda n: ("s", n)),
                 st.integers(0, len(TORCH_ZIP)).map(lambda n: ("z", n))))
def test_truncated_files(cut):
    kind, n = cut
    blob = (SAFETENSORS if kind == "s" else TORCH_ZIP)[:n]
    outcome = read_everything(blob, "model.bin")
    if n == len(SAFETENSORS if kind == "s" else TORCH_ZIP):
        assert outcome == "read"


@fuzz_settings(30)
@given(st.sampled_from(PREFIXES), st.binary(max_size=2048))
def test_random_bytes(prefix, blob):
    read_everything(prefix + blob, "model.pth")


@fuzz_settings(30)
@given(st.one_of(flipped(SAFETENSORS, focus=8 + HEADER_LENGTH), flipped(TORCH_ZIP)))
def test_flipped_bytes(blob):
    read_everything(blob, "model.ckpt")


@fuzz_settings(40)
@given(st.one_of(
    random_objects.map(lambda o: rezip({PICKLE_RECORD: pickle.dumps({"model": o}, protocol=2)})),
    random_objects.map(lambda o: rezip({PICKLE_RECORD: pickle.dumps(o, protocol=4)})),
    flipped(PICKLE).map(lambda p: rezip({PICKLE_RECORD: p})),
    st.binary(max_size=512).map(lambda p: rezip({PICKLE_RECORD: p})),
    st.sampled_from([n for n in zipfile.ZipFile(io.BytesIO(TORCH_ZIP)).namelist()]).map(
        lambda n: rezip({n: None})),
    random_objects.map(lambda o: pickle.dumps(o, protocol=2)),
    random_objects.map(lambda o: pickle.dumps({"model": o, "state_dict": o}, protocol=4)),
))
def test_random_pickles(blob):
    read_everything(blob, "model.pt")


def test_unmodified_samples_read_correctly():
    assert read_everything(SAFETENSORS, "a.safetensors") == "read"
    assert read_everything(TORCH_ZIP, "a.pth") == "read"


# -- legacy torch files ------------------------------------------------------------------------------------------

def _sample_legacy() -> bytes:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 6, generator=gen)
    buffer = io.BytesIO()
    torch.save({"model": {"w": w, "wt": w.t(), "row": w[1], "n": torch.tensor(7)}, "step": 2}, buffer,
               _use_new_zipfile_serialization=False)
    return buffer.getvalue()


LEGACY = _sample_legacy()


@fuzz_settings(40)
@given(st.one_of(flipped(LEGACY), st.integers(0, len(LEGACY)).map(lambda n: LEGACY[:n]),
                 random_objects.map(lambda o: LEGACY[:LEGACY.index(b"\x80\x02", 40)] + pickle.dumps(o, protocol=2))))
def test_mutated_legacy_files(blob):
    read_everything(blob, "legacy.pth")


# -- metadata built from pickles: shared references, nesting, odd values -----------------------------------------

SHARED = "s" * 100_000


@st.composite
def hostile_metadata(draw):
    """Objects whose pickle is small but whose naive JSON view is huge or odd: shared references doubled over
    many levels, long strings referenced many times, deep nesting, huge integers, non-finite floats, lone
    surrogates, non-string keys."""
    leaf = draw(st.sampled_from([SHARED, 10**draw(st.integers(0, 600)), float("nan"), float("-inf"), "bad\ud800",
                                 b"bytes", None, (1, 2), frozenset({3})]))
    value = leaf
    for _ in range(draw(st.integers(0, 45))):
        kind = draw(st.sampled_from(["list", "dict", "tuple", "keyed"]))
        value = ([value, value] if kind == "list" else {"a": value, "b": value} if kind == "dict"
                 else (value, value) if kind == "tuple" else {(1, "k"): value, 5: value})
    return {"model": {"w": torch.arange(4.0)}, "meta": value, "more": [value] * draw(st.integers(0, 300))}


@fuzz_settings(40)
@given(hostile_metadata(), st.booleans())
def test_hostile_metadata(obj, legacy):
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    outcome = read_everything(buffer.getvalue(), "meta.pth")
    assert outcome == "read"


def _metadata_json(blob: bytes) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.pth"
        path.write_bytes(blob)
        with open_checkpoint(path) as checkpoint:
            text = json.dumps(checkpoint.metadata, ensure_ascii=False)
            text.encode("utf-8")
            plain_config(checkpoint.metadata)
            return text


@fuzz_settings(25)
@given(hostile_metadata())
def test_hostile_metadata_is_bounded_json(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    text = bounded(lambda: _metadata_json(buffer.getvalue()))
    assert len(text) < 2 * MAX_METADATA_CHARS + 20 * MAX_METADATA_VALUES


# -- shard indexes -----------------------------------------------------------------------------------------------

SHARD_A = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int32)}
SHARD_B = {"c": torch.ones(4, dtype=torch.bfloat16)}
INDEX = {"metadata": {"total_size": 36}, "weight_map": {"a": "s-1.safetensors", "b": "s-1.safetensors",
                                                        "c": "s-2.safetensors"}}
shard_names = st.sampled_from(["s-1.safetensors", "s-2.safetensors", "model.safetensors.index.json", "other.index.json",
                               "../s-1.safetensors", "/etc/passwd", "", ".", "sub/../s-2.safetensors", "fifo",
                               "missing.safetensors", "bad\ud800"])


@st.composite
def mutated_indexes(draw) -> bytes:
    index = copy.deepcopy(INDEX)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["shard", "drop", "add", "metadata", "value", "top", "raw"]))
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            break  # already replaced by a random value
        if action == "shard":
            index["weight_map"][draw(st.sampled_from(["a", "b", "c"]))] = draw(shard_names)
        elif action == "drop":
            index["weight_map"].pop(draw(st.sampled_from(["a", "b", "c"])), None)
        elif action == "add":
            index["weight_map"][draw(st.text(max_size=5))] = draw(shard_names | json_values)
        elif action == "metadata":
            index["metadata"] = draw(json_values)
        elif action == "value":
            index["weight_map"] = draw(json_values)
        elif action == "top":
            index = draw(json_values)
        else:
            return draw(flipped(json.dumps(index).encode()))
    text = json.dumps(index)
    if draw(st.booleans()):
        text = text.replace('"b"', '"a"', 1)  # a repeated key
    return text.encode("utf-8", "surrogatepass")


@fuzz_settings(50)
@given(mutated_indexes())
def test_mutated_shard_indexes(blob):
    with tempfile.TemporaryDirectory() as d:
        save_file(SHARD_A, f"{d}/s-1.safetensors")
        save_file(SHARD_B, f"{d}/s-2.safetensors")
        os.mkfifo(f"{d}/fifo")
        path = Path(d) / "model.safetensors.index.json"
        path.write_bytes(blob)

        def read():
            try:
                with open_checkpoint(path) as checkpoint:
                    return {n: i.read().clone().reshape(i.shape) for n, i in checkpoint.tensors.items()}
            except StreamMergeError as exc:
                assert str(path) in str(exc), exc
                return None
        values = bounded(read)
        if values is not None:
            reference = {**SHARD_A, **SHARD_B}
            for name, tensor in values.items():
                assert same_bytes(tensor, reference[name]), name


# -- configs -----------------------------------------------------------------------------------------------------

CONFIG_MODEL = SAFETENSORS
VALID_CONFIG = """output: out.safetensors
models:
  - path: {m0}
    weight: 0.6
  - path: {m1}
    weight: 0.4
method: linear
rules:
  - match: "a"
    take: 0
  - match: "re:^[bc]$"
    weights: [0.5, 0.5]
dtype: float32
max_ram: 256MiB
seed: 3
nan_policy: error
"""
config_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
    | st.sampled_from(["linear", "float16", "512MiB", "9" * 400, "1e400", "\\9", "*", "re:(", "allow", "alow"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
CONFIG_KEYS = ["output", "models", "method", "rules", "dtype", "out_dtype", "max_ram", "shard_size", "seed",
               "rename", "nan_policy", "normalize", "t", "base", "parameters", "unknown"]


@st.composite
def hostile_configs(draw) -> tuple[bytes, str]:
    kind = draw(st.sampled_from(["value", "bytes", "aliases", "duplicate", "encoding", "json"]))
    text = VALID_CONFIG
    if kind == "value":
        data = yaml.safe_load(text)
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.sampled_from(CONFIG_KEYS))] = draw(config_values)
        return yaml.safe_dump(data).encode(), ".yaml"
    if kind == "bytes":
        return draw(flipped(text.encode())), ".yaml"
    if kind == "aliases":
        levels, width = draw(st.integers(1, 40)), draw(st.integers(1, 9))
        lines = [f"x0: &a0 [{', '.join(['v'] * width)}]"]
        lines += [f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
        key = draw(st.sampled_from(CONFIG_KEYS))
        return ("\n".join(lines) + "\n" + text + f"{key}: *a{levels - 1}\n").encode(), ".yaml"
    if kind == "duplicate":
        line = draw(st.sampled_from([l for l in text.splitlines() if ":" in l]))
        return text.replace(line, line + "\n" + line, 1).encode(), ".yaml"
    if kind == "encoding":
        return (text + "# modèle\n").encode(draw(st.sampled_from(["latin-1", "utf-16", "utf-32", "cp1252"]))), ".yaml"
    data = yaml.safe_load(text)
    data[draw(st.sampled_from(CONFIG_KEYS))] = draw(config_values)
    blob = json.dumps(data)
    if draw(st.booleans()):
        blob = blob.replace("[", "[" * 5000, 1)
    return blob.encode(), ".json"


@fuzz_settings(60)
@given(hostile_configs())
def test_hostile_configs(case):
    blob, suffix = case
    with tempfile.TemporaryDirectory() as d:
        for i in range(2):
            Path(f"{d}/m{i}.safetensors").write_bytes(CONFIG_MODEL)
        path = Path(d) / f"c{suffix}"
        path.write_bytes(blob.replace(b"{m0}", f"{d}/m0.safetensors".encode())
                         .replace(b"{m1}", f"{d}/m1.safetensors".encode()))

        def load():
            try:
                config = load_config(path)
            except ConfigError as exc:
                message = str(exc)
                assert str(path) in message and len(message) < 4000, message[:400]
                return None
            return config
        bounded(load)
