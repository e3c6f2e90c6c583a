#!/usr/bin/env python3
"""Realistic synthetic checkpoints for tests, benchmarks and the demo.

XTTS-v2-shaped state dicts (every name, shape and dtype of the real `model` state dict, random weights),
optionally shrunk so tests stay small, written as safetensors (streamed, low RAM), plain torch files or
Coqui-trainer-style containers; and Llama-shaped models (hidden 2048, 16 layers, grouped-query attention,
1.34 GB in float32), model 0 a base and the others fine-tunes of it (small random deltas), as task-vector
methods expect.

    python scripts/synth.py xtts OUT_DIR [--count 3] [--shrink 1] [--format safetensors|pth|trainer]
    python scripts/synth.py llama OUT_DIR [--count 4] [--dtype float32|bfloat16]
    python scripts/synth.py demo OUT_DIR
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

KEYS_FILE = Path(__file__).resolve().parent / "data" / "xtts_v2_keys.tsv"


def xtts_entries(shrink: int = 1) -> list[tuple[str, tuple, torch.dtype]]:
    """(name, shape, dtype) of every XTTS-v2 tensor; `shrink` divides every dimension above 8 by that factor."""
    entries = []
    for line in KEYS_FILE.read_text().splitlines():
        name, shape, dtype = line.split("\t")
        # (not ast.literal_eval: CPython 3.11's parser is not safe to call from several threads at once)
        shape = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        if shrink > 1:
            shape = tuple(max(8, d // shrink) if d > 8 else d for d in shape)
        entries.append((name, shape, getattr(torch, dtype.removeprefix("torch."))))
    return entries


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def random_tensor(name: str, shape: tuple, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Deterministic per (seed, name): weights ~ N(0, 0.02); int tensors are a fixed counter (all models agree)."""
    if not dtype.is_floating_point:
        return torch.full(shape, 1000, dtype=dtype)
    gen = torch.Generator().manual_seed(tensor_seed(seed, name))
    return (torch.randn(shape, generator=gen) * 0.02).to(dtype)


def state_dict(seed: int, shrink: int = 1, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape, dt in xtts_entries(shrink):
        out[name] = random_tensor(name, shape, dtype if (dtype is not None and dt.is_floating_point) else dt, seed)
    return out


LLAMA = {"vocab": 16384, "hidden": 2048, "layers": 16, "intermediate": 1536, "kv": 256}
FINETUNE_SCALE = 0.1  # a fine-tune's delta is this fraction of the base's weights, in standard deviation


def llama_entries(dtype: torch.dtype = torch.float32, vocab: int = LLAMA["vocab"], hidden: int = LLAMA["hidden"],
                  layers: int = LLAMA["layers"], intermediate: int = LLAMA["intermediate"],
                  kv: int = LLAMA["kv"]) -> list[tuple[str, tuple, torch.dtype]]:
    """(name, shape, dtype) of a Llama-architecture state dict (tied embeddings)."""
    entries = [("model.embed_tokens.weight", (vocab, hidden), dtype)]
    for i in range(layers):
        p = f"model.layers.{i}."
        entries += [(p + "input_layernorm.weight", (hidden,), dtype),
                    (p + "self_attn.q_proj.weight", (hidden, hidden), dtype),
                    (p + "self_attn.k_proj.weight", (kv, hidden), dtype),
                    (p + "self_attn.v_proj.weight", (kv, hidden), dtype),
                    (p + "self_attn.o_proj.weight", (hidden, hidden), dtype),
                    (p + "post_attention_layernorm.weight", (hidden,), dtype),
                    (p + "mlp.gate_proj.weight", (intermediate, hidden), dtype),
                    (p + "mlp.up_proj.weight", (intermediate, hidden), dtype),
                    (p + "mlp.down_proj.weight", (hidden, intermediate), dtype)]
    return entries + [("model.norm.weight", (hidden,), dtype)]


def finetuned_tensor(name: str, shape: tuple, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Seed 0 is the base; seed i > 0 is the base plus a small random delta (a fine-tune of it)."""
    base = random_tensor(name, shape, torch.float32, 0)
    if seed:
        base += random_tensor(name, shape, torch.float32, seed) * FINETUNE_SCALE
    return base.to(dtype)


def write_safetensors(path: Path, seed: int, shrink: int = 1, entries=None, make=random_tensor) -> None:
    """Stream a synthetic safetensors file (XTTS-shaped unless `entries` are given), one tensor in memory at a
    time; `make(name, shape, dtype, seed)` gives each tensor."""
    from streammerge.io.safetensors_io import SafetensorsWriter

    entries = entries if entries is not None else xtts_entries(shrink)
    writer = SafetensorsWriter(path, [(n, d, s) for n, s, d in entries], {"format": "pt"})
    writer.open()
    try:
        for name, shape, dtype in entries:
            writer.write(name, 0, make(name, shape, dtype, seed).reshape(-1))
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def trainer_checkpoint(model: dict, step: int, epoch: int, train_loss: float, eval_loss: float,
                       prefix: str = "", optimizer: bool = False, config=None) -> dict:
    """A Coqui-trainer-style container around `model`."""
    ckpt = {
        "config": config if config is not None else {"model": "xtts", "audio": {"sample_rate": 22050}},
        "model": {prefix + k: v for k, v in model.items()},
        "step": step,
        "epoch": epoch,
        "date": "Nov-24-2026_10+00AM",
        "model_loss": {"train_loss": train_loss, "eval_loss": eval_loss},
    }
    if optimizer:
        ckpt["optimizer"] = {"state": {i: {"exp_avg": torch.zeros(4), "exp_avg_sq": torch.zeros(4)}
                                       for i in range(3)}, "param_groups": [{"lr": 5e-6, "params": [0, 1, 2]}]}
        ckpt["scaler"] = {"scale": 65536.0}
    return ckpt


def write_models(out_dir: Path, count: int, fmt: str, shrink: int, first_seed: int = 0) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(first_seed, first_seed + count):
        if fmt == "safetensors":
            path = out_dir / f"model{i}.safetensors"
            write_safetensors(path, seed=i, shrink=shrink)
        else:
            path = out_dir / f"model{i}.pth"
            model = state_dict(seed=i, shrink=shrink)
            obj = (trainer_checkpoint(model, step=1000 * (i + 1), epoch=i + 1, train_loss=1.0 + i, eval_loss=2.0 + i)
                   if fmt == "trainer" else model)
            torch.save(obj, path)
        paths.append(path)
    return paths


def write_llama(out_dir: Path, count: int, dtype: torch.dtype = torch.float32,
                layers: int = LLAMA["layers"], shrink: int = 1) -> list[Path]:
    """model0 (the base) .. model{count-1} (fine-tunes of it), Llama-shaped, as safetensors; `shrink` divides
    the vocabulary, hidden, intermediate and key/value sizes."""
    sizes = {k: LLAMA[k] // shrink for k in ("vocab", "hidden", "intermediate", "kv")}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = out_dir / f"model{i}.safetensors"
        write_safetensors(path, seed=i, entries=llama_entries(dtype, layers=layers, **sizes), make=finetuned_tensor)
        paths.append(path)
    return paths


def write_many_small(out_dir: Path, count: int, tensors: int = 50_000, size: int = 64) -> list[Path]:
    """`count` safetensors files of `tensors` float32 tensors of `size` elements each (the many-small-tensors
    case, where per-tensor overhead rather than bytes sets the time)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        data = torch.randn(tensors, size, generator=g)
        paths.append(out_dir / f"model{i}.safetensors")
        save_file({f"blocks.{j // 10}.layer{j % 10}.weight": data[j].clone() for j in range(tensors)}, paths[-1],
                  metadata={"format": "pt"})
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    x = sub.add_parser("xtts", help="XTTS-v2-shaped checkpoints with random weights")
    x.add_argument("out_dir", type=Path)
    x.add_argument("--count", type=int, default=3)
    x.add_argument("--shrink", type=int, default=1, help="divide dimensions by this (1 = real size, 1.87 GB)")
    x.add_argument("--format", choices=["safetensors", "pth", "trainer"], default="safetensors")
    ll = sub.add_parser("llama", help="a Llama-shaped base and fine-tunes of it")
    ll.add_argument("out_dir", type=Path)
    ll.add_argument("--count", type=int, default=4)
    ll.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ll.add_argument("--layers", type=int, default=LLAMA["layers"], help="decoder layers (16: 1.34 GB in float32)")
    ll.add_argument("--shrink", type=int, default=1, help="divide vocabulary, hidden and intermediate sizes by this")
    d = sub.add_parser("demo", help="the small demo set that `make merge` uses")
    d.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    if args.what == "xtts":
        paths = write_models(args.out_dir, args.count, args.format, args.shrink)
    elif args.what == "llama":
        paths = write_llama(args.out_dir, args.count, getattr(torch, args.dtype), args.layers, args.shrink)
    else:
        paths = write_models(args.out_dir, 2, "safetensors", shrink=16)
        paths += write_models(args.out_dir, 1, "trainer", shrink=16, first_seed=2)
    for p in paths:
        print(f"wrote {p} ({p.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
