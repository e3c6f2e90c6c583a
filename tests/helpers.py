"""Shared test helpers: build checkpoints, run merges in-process, reference merges in memory."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from streammerge.config import parse_config
from streammerge.engine import Engine, prepare


def merge_in_process(cfg: dict, chunk: int | None = None, max_ram: int | None = None, **engine_options):
    """Run a merge from a config dict; `chunk` forces the chunk size in elements."""
    prepared = prepare(parse_config(cfg), None, max_ram)
    if chunk is not None:
        prepared.budget.chunk_elements = chunk
    try:
        return Engine(prepared, quiet=True, **engine_options).run()
    finally:
        prepared.close()


def load_output(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file or a sharded directory, through the safetensors library."""
    path = Path(path)
    if path.is_dir():
        out = {}
        for shard in sorted(path.glob("*.safetensors")):
            out.update(load_file(shard))
        return out
    return load_file(path)


def reference_linear(models: list[dict], weights: list[float], normalize: bool = True,
                     acc=torch.float32) -> dict[str, torch.Tensor]:
    """The in-memory merge users write by hand: sum_i w_i * x_i (normalized), in the accumulation dtype."""
    total = sum(weights) if normalize else 1.0
    out = {}
    for name, first in models[0].items():
        if not first.is_floating_point():
            out[name] = first
            continue
        acc_value = models[0][name].to(acc) * (weights[0] / total)
        for m, w in zip(models[1:], weights[1:]):
            acc_value = acc_value + m[name].to(acc) * (w / total)
        out[name] = acc_value.to(first.dtype)
    return out


def random_state_dict(seed: int, dtype=torch.float32, sizes=((64, 32), (128,), (300, 7))) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {f"layer{i}.weight": torch.randn(shape, generator=g).to(dtype) for i, shape in enumerate(sizes)}
    sd["layer0.num_batches_tracked"] = torch.tensor(7)
    return sd


def save(sd: dict, path: Path) -> Path:
    path = Path(path)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)
    return path


def drop_from_cache(path: Path) -> None:
    """Make a file cold: its pages written to disk and dropped from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_pieces(path: Path, block: int) -> list[bool]:
    """For each `block`-sized piece of the file (the last one may be shorter): wholly in the page cache?"""
    from streammerge.io.mapped import MappedFile

    mapped = MappedFile(path)
    try:
        return [mapped.is_cached(offset, block) for offset in range(0, mapped.size, block)]
    finally:
        mapped.close()


def cached(path: Path, offset: int, nbytes: int) -> bool:
    """Whether the file's bytes [offset, offset + nbytes) are all in the page cache."""
    from streammerge.io.mapped import MappedFile

    mapped = MappedFile(path)
    try:
        return mapped.is_cached(offset, nbytes)
    finally:
        mapped.close()
