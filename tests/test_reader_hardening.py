"""Hostile or odd inputs to the readers: clean errors (or the tensors torch reads) in bounded time and memory.

Pickle memo bombs and deep nesting, Parameters built by REDUCE, lone surrogates in names, FIFOs and devices,
self-referencing shard indexes, headers the safetensors library accepts, strided tensors at unaligned offsets.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import time
from collections import OrderedDict
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt_fixtures import save_legacy
from safety_support import run_main
from streammerge.errors import CheckpointError, MemoryBudgetError, PlanError, StreamMergeError
from streammerge.io import open_checkpoint
from streammerge.io.containers import MAX_METADATA_CHARS, MAX_METADATA_VALUES, find_state_dict, to_jsonable
from streammerge.memory import MemoryGuard, anon_rss


def read_all(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as checkpoint:
        return {n: i.read().clone().reshape(i.shape) for n, i in checkpoint.tensors.items()}


def within(seconds: float, memory: int, action):
    """Run `action()`; assert it took less than `seconds` and grew anonymous memory by less than `memory`."""
    before, started = anon_rss(), time.monotonic()
    with MemoryGuard(1 << 62) as guard:
        result = action()
    assert time.monotonic() - started < seconds, f"took {time.monotonic() - started:.1f} s"
    assert guard.peak - before < memory, f"memory grew by {(guard.peak - before) >> 20} MiB"
    return result


def saver(legacy: bool):
    return save_legacy if legacy else (lambda obj, path: torch.save(obj, path) or path)


# -- pickle memo bombs and deep nesting --------------------------------------------------------------------------

def doubling(levels: int, leaf="x"):
    value = leaf
    for _ in range(levels):
        value = [value, value]
    return value


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("bomb", ["doubling lists", "doubling dicts", "shared long string", "namespace"])
def test_memo_bombs_are_bounded(tmp_path, legacy, bomb):
    if bomb == "doubling lists":
        meta = doubling(40)
    elif bomb == "doubling dicts":
        meta = "x"
        for _ in range(40):
            meta = {"a": meta, "b": meta}
    elif bomb == "shared long string":
        meta = ["y" * 1_000_000] * 1000
    else:
        meta = argparse.Namespace(cfg=doubling(40))  # not weights_only: the restricted unpickler reads it
    path = saver(legacy)({"model": {"w": torch.arange(6.0)}, "meta": meta}, tmp_path / "bomb.pth")
    assert path.stat().st_size < 3_000_000

    def read():
        with open_checkpoint(path) as checkpoint:
            text = json.dumps(checkpoint.metadata)
            return checkpoint.tensors["w"].read().clone(), text
    tensor, text = within(60, 256 * 1024**2, read)  # generous: the suite may run on a busy machine
    assert torch.equal(tensor, torch.arange(6.0))
    assert len(text) < MAX_METADATA_CHARS * 1.2 + 10 * MAX_METADATA_VALUES
    assert "omitted" in text


def test_memo_bomb_through_the_cli(cli, tmp_path):
    """`inspect` runs in this process (its output is the point); `convert` under a budget is a process of its
    own, whose memory the budget measures."""
    path = torch_save({"model": {"w": torch.arange(6.0)}, "meta": doubling(40)}, tmp_path / "bomb.pth")
    for runner, args in ((run_main, ["inspect", path]), (run_main, ["inspect", path, "--json"]),
                         (partial(cli, timeout=120),
                          ["convert", path, "--output", tmp_path / "o.safetensors", "--max-ram", "256MiB"])):
        started = time.monotonic()
        result = runner(*args)
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 60
    assert torch.equal(load_file(tmp_path / "o.safetensors")["w"], torch.arange(6.0))


def torch_save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _nested_search_seconds(depth: int) -> float:
    deep = {}
    node = deep
    for _ in range(depth):
        node["a"] = {}
        node = node["a"]
    obj = {"model": {"w": torch.zeros(3)}, "meta": deep}
    started = time.perf_counter()
    tensors, key, rest = find_state_dict(obj, Path("x.pth"))
    json.dumps(to_jsonable(rest))
    assert key == "model" and list(tensors) == ["w"]
    return time.perf_counter() - started


def test_deeply_nested_metadata_is_linear():
    """200,000 nested mappings cost about ten times what 20,000 do (a quadratic search costs a hundred)."""
    small = min(_nested_search_seconds(20_000) for _ in range(3))
    large = _nested_search_seconds(200_000)
    assert large < 30 * small + 0.5, (small, large)


def test_metadata_view_is_bounded_in_values():
    wide = {f"k{i}": i for i in range(3 * MAX_METADATA_VALUES)}
    view = to_jsonable(wide)
    assert len(view) <= MAX_METADATA_VALUES + 1
    assert "omitted" in json.dumps(view)


def test_huge_integers_and_surrogates_in_metadata():
    view = to_jsonable({"step": 10**400, "big": 10**5000, "name": "bad\ud800", "bad\udcff": 1})
    text = json.dumps(view, ensure_ascii=False)
    text.encode("utf-8")
    assert view["step"].startswith("1000") and isinstance(view["big"], str)


# -- Parameters built by REDUCE ----------------------------------------------------------------------------------

class ParameterByReduce:
    """Pickles as `torch.nn.parameter.Parameter(tensor, requires_grad)` called by REDUCE."""

    def __init__(self, tensor):
        self.tensor = tensor

    def __reduce__(self):
        return torch.nn.parameter.Parameter, (self.tensor, False)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("extra", [{}, {"args": argparse.Namespace(lr=0.1)}], ids=["plain", "namespace"])
def test_parameter_built_by_reduce_is_its_tensor(tmp_path, legacy, extra):
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(4, 3, generator=gen), torch.randn(4, generator=gen)
    path = saver(legacy)({"model": {"w": ParameterByReduce(weight), "b": bias}, **extra}, tmp_path / "p.pth")
    trusted = torch.load(path, weights_only=False)["model"]
    assert torch.equal(trusted["w"], weight)
    tensors = read_all(path)
    assert sorted(tensors) == ["b", "w"]
    assert torch.equal(tensors["w"], weight) and torch.equal(tensors["b"], bias)


def test_parameter_of_something_else_is_refused(tmp_path):
    class Odd:
        def __reduce__(self):
            return torch.nn.parameter.Parameter, ("not a tensor",)
    path = torch_save({"model": {"w": Odd(), "b": torch.zeros(2)}, "args": argparse.Namespace()}, tmp_path / "p.pth")
    with pytest.raises(CheckpointError):
        read_all(path)


# -- tensor names that are not valid Unicode ---------------------------------------------------------------------

def test_lone_surrogate_in_safetensors_name(tmp_path):
    header = '{"bad\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'.encode()
    path = tmp_path / "s.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(CheckpointError, match="not valid Unicode"):
        read_all(path)
    for args in (["inspect", path], ["inspect", path, "--json"], ["diff", path, path]):
        result = run_main(*args)  # the command line's code path, in this process
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert "not valid Unicode" in result.stderr


def test_lone_surrogate_in_safetensors_metadata(tmp_path):
    header = ('{"__metadata__": {"k": "v\\udc00"}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
              ).encode()
    path = tmp_path / "s.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(CheckpointError, match="__metadata__"):
        read_all(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_lone_surrogate_in_pickled_name(tmp_path, legacy):
    path = saver(legacy)({"model": {"bad\ud800": torch.zeros(2), "ok": torch.ones(2)}}, tmp_path / "s.pth")
    with pytest.raises(CheckpointError, match="not valid Unicode"):
        read_all(path)


# -- what the safetensors library accepts ------------------------------------------------------------------------

@pytest.mark.parametrize("header", [
    '{"__metadata__": null, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
    '   \n\t{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
    ' ' * 80 + '{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}  ',
])
def test_headers_the_safetensors_library_accepts(tmp_path, header):
    path = tmp_path / "s.safetensors"
    data = struct.pack("<2f", 1.5, -2.0)
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + data)
    assert load_file(path)["a"].tolist() == [1.5, -2.0]
    assert read_all(path)["a"].tolist() == [1.5, -2.0]


def test_empty_header_is_called_empty(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, path)
    assert load_file(path) == {}
    assert read_all(path) == {}
    from streammerge.config import parse_config
    from streammerge.engine import prepare
    with pytest.raises(PlanError, match="holds no tensors") as info:
        prepare(parse_config({"output": str(tmp_path / "o.safetensors"), "models": [str(path)]}))
    assert "dropped" not in str(info.value)


# -- special files -----------------------------------------------------------------------------------------------

def test_fifo_and_device_inputs_are_refused_without_blocking(tmp_path, cli):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        started = time.monotonic()
        with pytest.raises(CheckpointError, match="not a regular file"):
            open_checkpoint(path)
        assert time.monotonic() - started < 5
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.ones(2)}, good)
    config = tmp_path / "c.yaml"
    config.write_text(f"output: {tmp_path / 'o.safetensors'}\nmodels: [{good}, {fifo}]\n")
    result = cli("merge", config, timeout=60)
    assert result.returncode == 1 and "not a regular file" in result.stderr, result.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_fifo_inside_a_converted_tree(tmp_path, cli):
    tree = tmp_path / "tree"
    tree.mkdir()
    save_file({"a": torch.ones(2)}, tree / "good.safetensors")
    os.mkfifo(tree / "stuck.pth")
    os.mkfifo(tree / "model.safetensors.index.json")
    result = cli("convert", tree, "--output", tmp_path / "out", timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "converted" in result.stdout and "not a regular file" in result.stdout
    assert torch.equal(load_file(tmp_path / "out" / "good.safetensors")["a"], torch.ones(2))


# -- shard indexes that refer to themselves ----------------------------------------------------------------------

def index(path: Path, weight_map: dict) -> Path:
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def test_index_referring_to_itself(tmp_path, cli):
    path = index(tmp_path / "model.safetensors.index.json", {"a": "model.safetensors.index.json"})
    with pytest.raises(CheckpointError, match="the index itself"):
        open_checkpoint(path)
    result = cli("convert", tmp_path, "--output", tmp_path / "out", timeout=60)
    assert result.returncode == 1 and "1 failed" in result.stderr, result.stdout
    assert "the index itself" in result.stdout


def test_indexes_referring_to_each_other(tmp_path, cli):
    index(tmp_path / "a.index.json", {"x": "b.index.json"})
    index(tmp_path / "b.index.json", {"x": "a.index.json"})
    with pytest.raises(CheckpointError, match="another shard index"):
        open_checkpoint(tmp_path / "a.index.json")
    result = cli("convert", tmp_path, "--output", tmp_path / "out", timeout=60)
    assert result.returncode == 1 and "2 failed" in result.stderr, result.stdout


def test_index_that_is_a_fifo_or_device(tmp_path):
    fifo = tmp_path / "f.index.json"
    os.mkfifo(fifo)
    with pytest.raises(StreamMergeError, match="not a regular file"):
        open_checkpoint(fifo)


# -- strided tensors at unaligned offsets stream in bounded memory -----------------------------------------------

def test_strided_unaligned_legacy_tensor_reads_a_chunk_without_copying_the_tensor(tmp_path):
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(2048, 4096, generator=gen)  # 32 MiB
    # Legacy files order storages by their keys (memory addresses), so whether `t` follows `odd` varies from
    # process to process: vary the pickle's length (a name) and odd's until `t` lies at an unaligned offset.
    for odd in range(1, 8):
        sd = OrderedDict([("o" * odd, torch.arange(odd, dtype=torch.uint8)), ("t", big.t())])
        path = save_legacy(sd, tmp_path / "legacy.pth")
        with open_checkpoint(path) as checkpoint:
            if not checkpoint.tensors["t"].aligned:
                break
    with open_checkpoint(path) as checkpoint:
        info = checkpoint.tensors["t"]
        assert info.stride is not None and not info.aligned
        expected = big.t().reshape(-1)
        chunk = 1 << 16
        staging = torch.empty(chunk * 4, dtype=torch.uint8)
        for start in (0, 12345, expected.numel() - chunk):
            got = within(30, 8 * 1024**2, lambda: info.read(start, start + chunk).clone())
            assert torch.equal(got, expected[start:start + chunk])
            assert torch.equal(info.read(start, start + chunk, staging), expected[start:start + chunk])


# -- JSON output strict parsers accept ---------------------------------------------------------------------------

def strict_loads(text: str):
    def refuse(constant):
        raise ValueError(f"bare {constant} in JSON output")
    return json.loads(text, parse_constant=refuse)


def test_inspect_and_diff_json_have_no_bare_nan(tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"model": {"z": torch.zeros(4), "w": torch.ones(3)}, "loss": float("nan"), "best": float("inf"),
                "hist": [1.0, float("-inf")]}, a)
    torch.save({"model": {"z": torch.zeros(4), "w": torch.full((3,), 2.0)}}, b)
    result = run_main("inspect", a, "--json")  # the command line's code path, in this process
    assert result.returncode == 0, result.stderr
    report = strict_loads(result.stdout)
    assert report["metadata"]["loss"] is None and report["metadata"]["hist"] == [1.0, None]
    result = run_main("diff", a, b, "--json", "--tensors")
    assert result.returncode == 0, result.stderr
    strict_loads(result.stdout)
    assert "NaN" not in result.stdout


# -- header parsing counts against the budget --------------------------------------------------------------------

def test_huge_header_is_refused_against_the_budget_before_parsing(tmp_path, cli):
    n = 120_000
    header = json.dumps({f"model.layers.{i}.mlp.weight": {"dtype": "F32", "shape": [1],
                                                           "data_offsets": [4 * i, 4 * i + 4]} for i in range(n)})
    path = tmp_path / "many.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * (4 * n))
    config = tmp_path / "c.yaml"
    config.write_text(f"output: {tmp_path / 'o.safetensors'}\nmodels: [{path}]\nmax_ram: 256MiB\n")
    for args in (["merge", config], ["diff", path, path, "--max-ram", "256MiB"]):
        started = time.monotonic()
        result = cli(*args, timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert "its header is" in result.stderr and "max_ram" in result.stderr, result.stderr
        assert time.monotonic() - started < 60


def _with_pickle(path: Path, data: bytes) -> Path:
    """`path` (a zip-format torch file) with its data.pkl replaced by `data`."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        records = {info.filename: zf.read(info) for info in zf.infolist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, content in records.items():
            zf.writestr(name, data if name.endswith("/data.pkl") else content)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_memo_index_bomb_costs_nothing(tmp_path, legacy):
    """A pickle of a few bytes that memoizes an object at index 2**25: the C unpickler sized its memo array by
    that index (512 MiB allocated and cleared; 2**31: 16 GiB). The restricted unpickler (the pickle names a
    class, so torch's weights_only loader refuses it) keeps its memo in a dict."""
    bomb = b"\x80\x02c__main__\nConfig\n)\x81r" + struct.pack("<I", 2**25) + b"."
    if legacy:
        path = save_legacy({"x": 1}, tmp_path / "bomb.pth")
        raw = path.read_bytes()
        # the fourth pickle (the object) follows the magic number, the protocol version and sys_info
        import io
        import pickle
        stream = io.BytesIO(raw)
        for _ in range(3):
            pickle.load(stream)
        start = stream.tell()
        pickle.load(stream)
        path.write_bytes(raw[:start] + bomb + raw[stream.tell():])
    else:
        torch.save({"x": 1}, tmp_path / "bomb.pth")
        path = _with_pickle(tmp_path / "bomb.pth", bomb)

    def read():
        with pytest.raises(CheckpointError, match="no tensors found"):
            open_checkpoint(path)
    within(60, 64 * 1024**2, read)


def test_large_pickle_is_refused_against_the_budget_before_unpickling(tmp_path, cli):
    """A zip checkpoint whose pickle holds 40 MB (here one long string): unpickling takes up to about ten times
    that, so with max_ram 256MiB it is refused up front, naming the file and the figure that would fit."""
    path = tmp_path / "big_pickle.pth"
    torch.save({"model": {"w": torch.ones(3)}, "notes": "n" * 40_000_000}, path)
    config = tmp_path / "c.yaml"
    config.write_text(f"output: {tmp_path / 'o.safetensors'}\nmodels: [{path}]\nmax_ram: 256MiB\n")
    result = cli("merge", config, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{path}: its pickle is" in result.stderr and "max_ram to at least" in result.stderr, result.stderr
    assert not (tmp_path / "o.safetensors").exists()
    config.write_text(f"output: {tmp_path / 'o.safetensors'}\nmodels: [{path}]\nmax_ram: 1GiB\n")
    result = cli("merge", config, "--quiet", timeout=120)
    assert result.returncode == 0, result.stderr
    assert torch.equal(load_file(tmp_path / "o.safetensors")["w"], torch.ones(3))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_of_empty_containers_stops_at_the_budget(tmp_path, legacy):
    """400,000 empty sets pickle to about 0.8 MB (EMPTY_SET, MEMOIZE, batched APPENDS) and unpickle to about
    120 MB: 150 times their size, where a state dict's pickle takes about 10 times. A legacy file's pickle has no
    size up front at all. Memory is watched while such pickles are read (and torch's own unpickler, which cannot
    be watched, gets only pickles that fit at the worst rate): reading stops at the budget, naming the file."""
    path = tmp_path / "sets.pth"
    torch.save({"model": {"w": torch.arange(6.0)}, "junk": [set() for _ in range(400_000)]}, path,
               pickle_protocol=4, _use_new_zipfile_serialization=not legacy)
    assert path.stat().st_size < 1_000_000
    budget = anon_rss() + 48 * 1024**2

    def read():
        with pytest.raises(MemoryBudgetError) as refused:
            open_checkpoint(path, max_ram=budget)
        return str(refused.value)
    message = within(60, 80 * 1024**2, read)
    assert str(path) in message and "pickle" in message and "max_ram" in message, message
    with open_checkpoint(path) as checkpoint:  # without a budget: half the free memory, which is plenty
        assert torch.equal(checkpoint.tensors["w"].read().clone(), torch.arange(6.0))


# -- a pickled XttsConfig becomes its fields, as to_dict() gives them ---------------------------------------------

def test_pickled_xtts_config_becomes_its_fields(tmp_path):
    from ckpt_fixtures import XTTS_CONFIG_PLAIN, XttsConfig, xtts_modules
    from streammerge.io.containers import plain_config

    config = XttsConfig()
    for node in (config, config.audio, config.model_args):  # what Coqpit and Coqui's model code leave behind
        node._initialized = True
    config.num_chars = 255
    with xtts_modules():
        path = torch_save({"model": {"w": torch.zeros(2)}, "config": config}, tmp_path / "x.pth")
    with open_checkpoint(path) as checkpoint:
        assert plain_config(checkpoint.metadata["config"]) == XTTS_CONFIG_PLAIN


def test_readme_states_the_limits_the_code_uses():
    """The safety section's numbers are the code's: change a limit and this names the README line to update."""
    from streammerge import config_file, errors, memory
    from streammerge.io import containers, safetensors_io, sharded, zip_check

    section = (Path(__file__).resolve().parent.parent / "README.md").read_text().split(
        "## Safety and failure behaviour")[1].split("\n## ")[0]
    mib = 1024**2
    stated = [
        f"at most {config_file.MAX_CONFIG_BYTES // mib} MiB", f"at most {config_file.MAX_CONFIG_NODES:,} values",
        f"at most {config_file.MAX_CONFIG_DEPTH} levels of nesting",
        f"at most 100 MB ({safetensors_io.MAX_HEADER:,} bytes)", f"at most 100 MB ({sharded.MAX_INDEX:,} bytes)",
        f"{memory.PARSE_BYTES_PER_BYTE} bytes of memory per header byte", f"{memory.OVERHEAD // mib} MiB margin",
        f"central directory at most {zip_check.MAX_CENTRAL_DIRECTORY // mib} MiB",
        f"pickle record at most {zip_check.MAX_PICKLE // mib} MiB",
        f"within {containers.MAX_METADATA_VALUES:,} values, {containers.MAX_METADATA_CHARS // mib} MiB of text and "
        f"{containers.MAX_METADATA_DEPTH} levels",
        f"at most {errors.short.__defaults__[0]} characters long",
        f"fits at {memory.PICKLE_WORST_BYTES_PER_BYTE} bytes per byte",
        f"after every {memory.MemoryCheckedFile.CHECK_EVERY // 1024} KiB it reads",
    ]
    missing = [text for text in stated if text not in section]
    assert not missing, missing
