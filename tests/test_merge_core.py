"""The streaming merge against in-memory references: formats, dtypes, rules, sharding, chunking."""

import json
import os
import stat

import pytest
import torch
from safetensors import safe_open

from helpers import (cached_pieces, drop_from_cache, load_output, merge_in_process, random_state_dict,
                     reference_linear, save)
from streammerge.config import parse_config
from streammerge.engine import Engine, prepare
from streammerge.errors import PlanError
from streammerge.io.mapped import PAGE
from streammerge.plan import COPY, MERGE


def assert_same(actual: dict, expected: dict, exact: bool = False):
    assert list(sorted(actual)) == list(sorted(expected))
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        assert actual[name].shape == value.shape, name
        if exact or not value.is_floating_point():
            assert torch.equal(actual[name], value), name
        else:
            torch.testing.assert_close(actual[name], value, rtol=2e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("fmt", [".safetensors", ".pth", ".bin"])
def test_linear_matches_reference_for_each_input_format(tmp_path, fmt):
    models = [random_state_dict(i) for i in range(3)]
    paths = [save(m, tmp_path / f"m{i}{fmt}") for i, m in enumerate(models)]
    weights = [0.5, 0.3, 0.2]
    out = tmp_path / "out.safetensors"
    merge_in_process({"output": str(out), "models": [{"path": str(p), "weight": w} for p, w in zip(paths, weights)]})
    assert_same(load_output(out), reference_linear(models, weights))


def test_mixed_formats_and_dtypes(tmp_path):
    models = [random_state_dict(0, torch.bfloat16), random_state_dict(1, torch.float16), random_state_dict(2)]
    paths = [save(models[0], tmp_path / "a.safetensors"), save({"model": models[1], "step": 5}, tmp_path / "b.pth"),
             save(models[2], tmp_path / "c.pt")]
    out = tmp_path / "out.safetensors"
    merge_in_process({"output": str(out), "models": [{"path": str(p), "weight": 1} for p in paths]})
    merged = load_output(out)
    expected = reference_linear(models, [1, 1, 1])  # out_dtype defaults to the first model's dtype: bf16
    assert_same(merged, expected)
    assert merged["layer0.weight"].dtype == torch.bfloat16


def test_out_dtype_float64_accumulation_and_normalize_off(tmp_path):
    models = [random_state_dict(i) for i in range(2)]
    paths = [save(m, tmp_path / f"m{i}.safetensors") for i, m in enumerate(models)]
    out = tmp_path / "out.safetensors"
    merge_in_process({"output": str(out), "models": [{"path": str(paths[0]), "weight": 0.7},
                                                     {"path": str(paths[1]), "weight": 0.9}],
                      "normalize": False, "dtype": "float64", "out_dtype": "float16"})
    merged = load_output(out)
    expected = reference_linear(models, [0.7, 0.9], normalize=False, acc=torch.float64)
    for name, value in expected.items():
        if value.is_floating_point():
            assert merged[name].dtype == torch.float16
            assert torch.equal(merged[name], value.to(torch.float64).to(torch.float16)), name
        else:
            assert torch.equal(merged[name], value)


def test_rules_take_weights_drop_and_regex(tmp_path):
    models = [random_state_dict(i) for i in range(2)]
    for m in models:
        m["optimizer.momentum"] = torch.ones(3)
    paths = [save(m, tmp_path / f"m{i}.safetensors") for i, m in enumerate(models)]
    out = tmp_path / "out.safetensors"
    merge_in_process({
        "output": str(out), "models": [{"path": str(paths[0]), "weight": 0.6}, {"path": str(paths[1]), "weight": 0.4}],
        "rules": [{"match": "layer0.*", "take": 1},
                  {"match": "re:^layer1\\.", "weights": [0.1, 0.9]},
                  {"match": "*.momentum", "drop": True}]})
    merged = load_output(out)
    assert "optimizer.momentum" not in merged
    assert torch.equal(merged["layer0.weight"], models[1]["layer0.weight"])
    assert torch.equal(merged["layer0.num_batches_tracked"], models[1]["layer0.num_batches_tracked"])
    torch.testing.assert_close(merged["layer1.weight"],
                               models[0]["layer1.weight"] * 0.1 + models[1]["layer1.weight"] * 0.9)
    torch.testing.assert_close(merged["layer2.weight"],
                               models[0]["layer2.weight"] * 0.6 + models[1]["layer2.weight"] * 0.4)


def test_chunked_merge_is_bit_identical_to_whole(tmp_path):
    models = [random_state_dict(i, sizes=((1000, 37), (5,), (64, 64, 3))) for i in range(3)]
    models[1] = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in models[1].items()}
    paths = [save(m, tmp_path / f"m{i}.safetensors") for i, m in enumerate(models)]
    cfg = {"models": [{"path": str(p), "weight": w} for p, w in zip(paths, [0.2, 0.5, 0.3])]}
    whole, chunked = tmp_path / "whole.safetensors", tmp_path / "chunked.safetensors"
    merge_in_process({**cfg, "output": str(whole)}, chunk=1 << 20)
    merge_in_process({**cfg, "output": str(chunked)}, chunk=997)  # not a divisor of any tensor size
    assert whole.read_bytes() == chunked.read_bytes()


def test_sharded_input_and_output(tmp_path):
    models = [random_state_dict(i, sizes=((256, 64), (64,), (512, 16), (8, 8))) for i in range(2)]
    # Model 0 as a Hugging Face sharded safetensors directory, model 1 as sharded zip-format .bin files.
    d0, d1 = tmp_path / "m0", tmp_path / "m1"
    d0.mkdir()
    d1.mkdir()
    names = list(models[0])
    half = len(names) // 2
    for d, sd, ext in ((d0, models[0], "safetensors"), (d1, models[1], "bin")):
        weight_map = {}
        for i, part in enumerate((names[:half], names[half:]), 1):
            shard = f"model-{i:05d}-of-00002.{ext}" if ext == "safetensors" else f"pytorch_model-{i:05d}-of-00002.bin"
            save({n: sd[n] for n in part}, d / shard)
            weight_map.update({n: shard for n in part})
        index = "model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
        (d / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    out = tmp_path / "merged"
    merge_in_process({"output": str(out), "shard_size": "40KB",
                      "models": [{"path": str(d0), "weight": 0.25}, {"path": str(d1), "weight": 0.75}]})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert set(index["weight_map"].values()) == set(shards)
    merged = load_output(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    for shard in shards:
        assert (out / shard).stat().st_size <= 40_000 + 4096 or len(safe_open(out / shard, "pt").keys()) == 1
        with safe_open(out / shard, "pt") as f:
            assert f.metadata()["format"] == "pt"
            assert set(f.keys()) == {n for n, s in index["weight_map"].items() if s == shard}
    assert_same(merged, reference_linear(models, [0.25, 0.75]))
    assert not list(tmp_path.rglob(".*tmp*"))


def test_tied_tensors_are_computed_once_and_written_under_each_name(tmp_path):
    models = []
    for i in range(2):
        sd = random_state_dict(i)
        sd["head.weight"] = sd["layer0.weight"]  # tied: one storage, two names
        models.append(sd)
    paths = [save(m, tmp_path / f"m{i}.pth") for i, m in enumerate(models)]
    cfg = {"output": str(tmp_path / "out.safetensors"), "models": [{"path": str(p)} for p in paths]}
    prepared = prepare(parse_config(cfg))
    tasks = {t.name: t for t in prepared.plan.tasks}
    prepared.close()
    assert list(tasks["layer0.weight"].aliases) == ["head.weight"] and "head.weight" not in tasks
    merge_in_process(cfg)
    merged = load_output(tmp_path / "out.safetensors")
    assert torch.equal(merged["head.weight"], merged["layer0.weight"])
    assert_same(merged, reference_linear(models, [1, 1]))


def test_tensors_are_processed_in_input_file_order(tmp_path):
    sd = {"z.first": torch.ones(4), "a.second": torch.ones(3), "m.third": torch.ones(2)}
    path = save(sd, tmp_path / "m.pth")  # torch keeps insertion order in the file
    prepared = prepare(parse_config({"output": str(tmp_path / "o.safetensors"),
                                     "models": [{"path": str(path)}, {"path": str(path)}]}))
    order = [t.name for t in prepared.plan.tasks]
    prepared.close()
    assert order == ["z.first", "a.second", "m.third"]


def test_int_tensors_copied_when_equal_refused_when_not(tmp_path):
    a, b = random_state_dict(0), random_state_dict(1)
    pa, pb = save(a, tmp_path / "a.safetensors"), save(b, tmp_path / "b.safetensors")
    out = tmp_path / "out.safetensors"
    merge_in_process({"output": str(out), "models": [{"path": str(pa)}, {"path": str(pb)}]})
    assert torch.equal(load_output(out)["layer0.num_batches_tracked"], torch.tensor(7))
    b["layer0.num_batches_tracked"] = torch.tensor(8)
    save(b, pb)
    out.unlink()
    with pytest.raises(PlanError, match="num_batches_tracked.*take: 0"):
        merge_in_process({"output": str(out), "models": [{"path": str(pa)}, {"path": str(pb)}]})
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))


def test_plan_kinds(tmp_path):
    p = save(random_state_dict(0), tmp_path / "a.safetensors")
    prepared = prepare(parse_config({"output": str(tmp_path / "o.safetensors"),
                                     "models": [{"path": str(p)}, {"path": str(p)}]}))
    kinds = {t.name: t.kind for t in prepared.plan.tasks}
    prepared.close()
    assert kinds["layer0.num_batches_tracked"] == COPY and kinds["layer0.weight"] == MERGE


def test_output_is_deterministic_and_follows_umask(tmp_path):
    paths = [save(random_state_dict(i), tmp_path / f"m{i}.safetensors") for i in range(2)]
    cfg = {"models": [{"path": str(p), "weight": 0.5} for p in paths]}
    old = os.umask(0o027)
    try:
        merge_in_process({**cfg, "output": str(tmp_path / "one.safetensors")})
        merge_in_process({**cfg, "output": str(tmp_path / "one.safetensors")})  # overwrite in place
        merge_in_process({**cfg, "output": str(tmp_path / "two.safetensors")})
    finally:
        os.umask(old)
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    assert stat.S_IMODE((tmp_path / "one.safetensors").stat().st_mode) == 0o640
    with safe_open(tmp_path / "one.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and json.loads(meta["streammerge"])["method"] == "linear"
    header_len = int.from_bytes((tmp_path / "one.safetensors").read_bytes()[:8], "little")
    assert header_len % 8 == 0


def test_mismatched_models_list_first_differences(tmp_path):
    a = random_state_dict(0)
    b = dict(random_state_dict(1))
    b["layer1.weight"] = torch.zeros(129)
    b["extra.bias"] = torch.zeros(2)
    del b["layer2.weight"]
    pa, pb = save(a, tmp_path / "a.safetensors"), save(b, tmp_path / "b.safetensors")
    with pytest.raises(PlanError) as err:
        merge_in_process({"output": str(tmp_path / "o.safetensors"), "models": [{"path": str(pa)}, {"path": str(pb)}]})
    message = str(err.value)
    assert "layer2.weight" in message and "extra.bias" in message and "layer1.weight" in message
    assert "[128]" in message and "[129]" in message and "intersection" in message
    assert not (tmp_path / "o.safetensors").exists()


def test_unaligned_legacy_inputs_merge_and_copy_exactly(tmp_path):
    """Legacy (pre-zip) torch files store tensors at arbitrary offsets: chunks are staged in reused buffers."""
    models = [random_state_dict(0, sizes=((999, 13), (7,))), random_state_dict(1, torch.bfloat16, sizes=((999, 13), (7,)))]
    paths = []
    for i, m in enumerate(models):
        paths.append(tmp_path / f"legacy{i}.pth")
        torch.save({"model": m, "note": "x" * (3 + i)}, paths[-1], _use_new_zipfile_serialization=False)
    prepared = prepare(parse_config({"output": str(tmp_path / "o.safetensors"),
                                     "models": [{"path": str(p)} for p in paths]}))
    assert any(not info.aligned for c in prepared.checkpoints for info in c.tensors.values())
    prepared.close()
    out = tmp_path / "out.safetensors"
    merge_in_process({"output": str(out), "models": [{"path": str(p), "weight": 0.5} for p in paths],
                      "rules": [{"match": "layer1.*", "take": 1}]}, chunk=1000)
    merged = load_output(out)
    expected = reference_linear(models, [0.5, 0.5])
    expected["layer1.weight"] = models[1]["layer1.weight"]
    assert_same(merged, expected)


def _cached_fraction(path) -> float:
    pieces = cached_pieces(path, 1 << 20)
    return sum(pieces) / len(pieces)


def _cached_pages(path) -> int:
    return sum(cached_pieces(path, PAGE))


def test_page_cache_is_left_as_found(tmp_path):
    """Inputs that were cached stay cached; pages the merge itself read from disk are dropped again."""
    models = [random_state_dict(i, sizes=((2048, 1024),)) for i in range(2)]
    paths = [save(m, tmp_path / f"m{i}.safetensors") for i, m in enumerate(models)]
    for p in paths:
        drop_from_cache(p)  # model 0: cold
    paths[1].read_bytes()  # model 1: warm

    assert _cached_fraction(paths[0]) == 0 and _cached_fraction(paths[1]) == 1
    merge_in_process({"output": str(tmp_path / "o.safetensors"), "models": [{"path": str(p)} for p in paths]},
                     chunk=1 << 16)
    assert _cached_fraction(paths[0]) < 0.1
    assert _cached_fraction(paths[1]) == 1


def test_pages_the_kernel_read_ahead_are_dropped_with_the_rest(tmp_path):
    """Cold inputs of many tensors, read front to back: the kernel's readahead for one tensor caches the next ones
    before the merge reaches them (they were not cached before the merge, so they are dropped after use too), in
    large folios that straddle tensors; pages mapped again by reads of later tensors go when the inputs close."""
    g = torch.Generator().manual_seed(0)
    # 48 MB, with tensors under a page between (those have no page of their own)
    models = [{f"{k:02d}{kind}": torch.randn(shape, generator=g) for k in range(40)
               for kind, shape in (("b", (1000,)), ("w", (300, 1001)))} for _ in range(2)]
    paths = [save(m, tmp_path / f"m{i}.safetensors") for i, m in enumerate(models)]
    for p in paths:
        drop_from_cache(p)
    assert _cached_pages(paths[0]) == 0
    prepared = prepare(parse_config({"output": str(tmp_path / "o.safetensors"),
                                     "models": [{"path": str(p)} for p in paths]}))
    try:
        headers = [_cached_pages(p) for p in paths]  # what parsing the headers read, before the merge
        Engine(prepared, quiet=True).run()
    finally:
        prepared.close()
    # no more than parsing the headers read (its readahead: pages of the first tensors, which then count as cached)
    after = [_cached_pages(p) for p in paths]
    assert all(n <= min(before, 64) for n, before in zip(after, headers)), (after, headers)


def test_folios_straddling_ranges_released_back_to_back_are_dropped(tmp_path):
    """Readahead caches a file in large folios, and the kernel drops only the folios wholly inside a range: released
    a range at a time, back to back, each folio straddling two ranges goes with the later one."""
    from streammerge.io.mapped import MappedFile

    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(24 << 20))
    drop_from_cache(path)
    with open(path, "rb", buffering=0) as f:  # read() reads ahead as for any reader, and maps nothing
        while f.read(1 << 20):
            pass
    mapped = MappedFile(path)
    try:
        step = 1_201_200  # ranges that do not fall on folio edges
        for offset in range(0, mapped.size, step):
            mapped.release(offset, min(step, mapped.size - offset))
        left = _cached_pages(path)  # (before this mapping's close sweeps again)
    finally:
        mapped.close()
    assert left == 0
