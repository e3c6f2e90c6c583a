"""The engine runs a chunk's math a cache-sized tile at a time for the methods that allow it (`Method.tiled`),
and selects elements with integer bit operations instead of torch's bool-mask kernels (`methods.masks`): both
must leave every output bit as it was."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import load_output, merge_in_process, save

from bench import streammerge_config

import streammerge.engine as engine_module
from streammerge.methods import masks
from streammerge.methods.method import GRID, TILE, tiles
from streammerge.methods.registry import methods

TILED = sorted(m.name for m in methods() if m.tiled)
SPECIAL = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 3.4e38]


def special_values(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    x[torch.randint(0, n, (n // 4,), generator=g)] = torch.tensor(SPECIAL, dtype=dtype)[
        torch.randint(0, len(SPECIAL), (n // 4,), generator=g)]
    return x


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({4: torch.int32, 8: torch.int64}[x.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mask_operations_give_torchs_bits(dtype):
    n = 10_007
    a = special_values(n, dtype, 1)
    mask = torch.rand(n, generator=torch.Generator().manual_seed(3)) < 0.5
    scratch = torch.empty(n, dtype=dtype)
    assert torch.equal(bits(masks.keep_only(a.clone(), mask, scratch)), bits(a.masked_fill(~mask, 0)))


def test_tiles_cover_the_chunk_in_order():
    n = 5 * GRID + 17
    inputs = [torch.arange(n, dtype=torch.float32) + i for i in range(2)]
    ctx = engine_module.ChunkContext("t", 3 * GRID, 10 * GRID, inputs, inputs[0] * 2, [{}, {}], {},
                                     torch.empty(n))
    parts = tiles(ctx, 2 * GRID)
    assert [p.offset for p in parts] == [3 * GRID, 5 * GRID, 7 * GRID]
    assert [p.out.numel() for p in parts] == [2 * GRID, 2 * GRID, GRID + 17]
    for p in parts:
        local = p.offset - ctx.offset
        assert p.inputs[1][0].item() == local + 1 and p.base[0].item() == 2 * local
        assert p.out.data_ptr() == ctx.out[local:].data_ptr()
    assert tiles(ctx, n) == [ctx]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A base and three fine-tunes with tensors of several tiles (odd lengths: a short last tile) and ties in
    magnitude (coarse values), one tensor smaller than a tile."""
    tmp = tmp_path_factory.mktemp("tiles")
    g = torch.Generator().manual_seed(0)
    shapes = {"big.weight": (700, 601), "wide.weight": (3, 3 * TILE + 5), "small.bias": (1000,)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    paths = []
    for k in range(3):
        model = {n: v + torch.round(torch.randn(s, generator=g) * 8) / 64 for (n, v), s in
                 zip(base.items(), shapes.values())}
        paths.append(save(model, tmp / f"model{k}.safetensors"))
    return paths, save(base, tmp / "base.safetensors")


@pytest.mark.parametrize("method", TILED)
@pytest.mark.parametrize("chunk", [None, 4 * GRID], ids=["whole-tensor chunks", "streamed"])
def test_tiled_merge_gives_the_untiled_bits(method, chunk, inputs, tmp_path, monkeypatch):
    paths, base = inputs
    # the method's typical parameters; 1 GiB: a pytest process alone holds up to ~240 MiB, which 256 MiB does not leave
    # room beside
    cfg = streammerge_config(method, paths, tmp_path / "unused", base, "1GiB")
    cfg["seed"] = 5
    outputs = {}
    for label, tiling in [("untiled", lambda ctx: [ctx]), ("grid", functools.partial(tiles, size=GRID)),
                          ("default", tiles)]:
        monkeypatch.setattr(engine_module, "tiles", tiling)
        out = tmp_path / f"{label}.safetensors"
        merge_in_process({**cfg, "output": str(out)}, chunk=chunk)
        outputs[label] = load_output(out)
    for label in ("grid", "default"):
        for name, tensor in outputs["untiled"].items():
            assert torch.equal(bits(outputs[label][name]), bits(tensor)), (label, name)


@pytest.mark.parametrize("chunk", [None, 4 * GRID], ids=["whole-tensor chunks", "streamed"])
def test_ramplus_counts_are_the_whole_tensors(chunk, inputs, tmp_path, monkeypatch):
    """`ramplus_tl`'s counts of the entries each model changes alone and with others, which its chunks' ranges
    (one per thread) add up, are those of the whole tensor, held whole or streamed."""
    from safetensors.torch import load_file

    from streammerge.methods import ram
    paths, base = inputs
    made = []

    class Recorded(ram.RamPlusStats):  # (the method's init_stats looks the class up in its module)
        def __init__(self, n_models: int):
            super().__init__(n_models)
            made.append(self)

    monkeypatch.setattr(ram, "RamPlusStats", Recorded)
    cfg = streammerge_config("ramplus_tl", paths, tmp_path / "out.safetensors", base, "1GiB")
    cfg["parameters"] = {"epsilon": 0.1}
    merge_in_process(cfg, chunk=chunk)
    models, origin = [load_file(p) for p in paths], load_file(base)
    expected = {}
    for name in origin:
        changed = torch.stack([(m[name] - origin[name]).abs() > 0.1 for m in models])
        count = changed.sum(0)
        expected[name] = ([int((c & (count == 1)).sum()) for c in changed],
                          [int((c & (count > 1)).sum()) for c in changed])
    assert sorted(tuple(s.counts.tolist()) for s in made) == sorted(expected.values())


def record_writes(monkeypatch) -> list[tuple[str, int, int]]:
    """(tensor, start, stop) of every piece the engine hands to the writer, in order."""
    writes: list[tuple[str, int, int]] = []
    write = engine_module._write_and_release

    def recorded(output, name, start, stop, *rest):
        writes.append((name, start, stop))
        return write(output, name, start, stop, *rest)

    monkeypatch.setattr(engine_module, "_write_and_release", recorded)
    return writes


@pytest.mark.parametrize("method", ["task_arithmetic", "passthrough"])
def test_a_merge_without_statistics_reads_and_writes_cache_sized_chunks_at_any_budget(method, inputs, tmp_path,
                                                                                     monkeypatch):
    """A tensor merged without statistics passes, or copied, streams in chunks of at most STREAM_CHUNK_BYTES per
    buffer even where the budget would hold it whole, with the bits of one chunk."""
    paths, base = inputs
    cfg = ({"method": method, "models": [{"path": str(p)} for p in paths], "base": {"path": str(base)}}
           if method == "task_arithmetic" else {"method": method, "models": [{"path": str(paths[0])}]})
    whole = tmp_path / "whole.safetensors"
    merge_in_process({**cfg, "output": str(whole)}, chunk=1 << 22)
    monkeypatch.setattr(engine_module, "STREAM_CHUNK_BYTES", 4 * GRID)
    chunks = []
    context = engine_module.Engine._context
    monkeypatch.setattr(engine_module.Engine, "_context",
                        lambda self, task, ws, a, z: chunks.append((task.name, a, z)) or context(self, task, ws, a, z))
    writes = record_writes(monkeypatch)
    streamed = tmp_path / "streamed.safetensors"
    merge_in_process({**cfg, "output": str(streamed)}, chunk=1 << 22)
    assert streamed.read_bytes() == whole.read_bytes()
    for name in ("big.weight", "wide.weight"):
        numel = load_output(whole)[name].numel()
        expected = [(a, min(numel, a + GRID)) for a in range(0, numel, GRID)]
        assert [(a, z) for n, a, z in writes if n == name] == expected
        if method == "task_arithmetic":  # (a copy reads no chunk into the merge's buffers)
            assert [(a, z) for n, a, z in chunks if n == name] == expected
