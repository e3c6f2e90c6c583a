"""`streammerge extract-lora FINETUNED BASE --rank R --output DIR`: the difference of two checkpoints as a PEFT
LoRA adapter (adapter_config.json + adapter_model.safetensors) that `PeftModel.from_pretrained` loads.

Every 2-D `*.weight` that differs becomes a LoRA module: the rank-R truncated SVD of delta = W_finetuned - W_base,
computed by a randomized range finder with power iterations (Halko, Martinsson & Tropp 2011) that reads delta a
block of rows at a time from the mapped files, so memory holds one block plus the (rows + cols) x (R + 10)
factors, never the whole matrix. lora_B = U S, lora_A = V^T, lora_alpha = r (scale 1); embeddings use peft's
lora_embedding_A/B layout. Differing 1-D tensors (norms) are saved whole as `modules_to_save`; anything else
that differs cannot be expressed by the adapter and is listed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from streammerge.errors import ConfigError, OutputError, StreamMergeError
from streammerge.io import TensorInfo, open_checkpoint
from streammerge.io.files import write_atomically
from streammerge.io.outputs import check_disk_space, make_output, output_spec
from streammerge.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX
from streammerge.memory import Budget, MemoryGuard
from streammerge.units import format_size, size_argument

OVERSAMPLE = 10
POWER_ITERATIONS = 2
EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|embed_in|wte|word_embeddings|tok_embeddings)\.weight$")
DEFAULT_MAX_RAM = 1024**3


@dataclass
class Target:
    module: str
    finetuned: TensorInfo
    base: TensorInfo
    rank: int
    embedding: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.finetuned.shape)

    def entries(self) -> list[tuple[str, torch.dtype, tuple]]:
        rows, cols = self.shape
        key = PREFIX + self.module
        if self.embedding:  # peft: delta = (B @ A)^T with A: r x num_embeddings, B: dim x r
            return [(f"{key}.lora_embedding_A", torch.float32, (self.rank, rows)),
                    (f"{key}.lora_embedding_B", torch.float32, (cols, self.rank))]
        return [(f"{key}.lora_A.weight", torch.float32, (self.rank, cols)),
                (f"{key}.lora_B.weight", torch.float32, (rows, self.rank))]


class DeltaReader:
    """Blocks of rows of delta = finetuned - base in float32, in reused buffers."""

    def __init__(self, chunk: int):
        self.chunk = chunk
        self.buffers = [torch.empty(chunk, dtype=torch.float32) for _ in range(2)]

    def blocks(self, target: Target):
        rows, cols = target.shape
        step = max(1, self.chunk // cols)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            n = (r1 - r0) * cols
            a = self.buffers[0][:n].copy_(target.finetuned.read(r0 * cols, r1 * cols))
            b = self.buffers[1][:n].copy_(target.base.read(r0 * cols, r1 * cols))
            target.finetuned.release(r0 * cols, r1 * cols, drop_cache=False)
            target.base.release(r0 * cols, r1 * cols, drop_cache=False)
            yield r0, r1, a.sub_(b).view(r1 - r0, cols)


def _orthonormal(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(m, mode="reduced").Q


def truncated_svd(reader: DeltaReader, target: Target, seed: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(U_r S_r, V_r^T, squared Frobenius norms of the residual and of delta) by a streamed randomized SVD."""
    rows, cols = target.shape
    k = min(rows, cols, target.rank + OVERSAMPLE)
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(cols, k, generator=generator, dtype=torch.float32)

    def times(right: torch.Tensor) -> torch.Tensor:  # delta @ right
        out = torch.empty(rows, right.shape[1], dtype=torch.float32)
        for r0, r1, block in reader.blocks(target):
            torch.mm(block, right, out=out[r0:r1])
        return out

    def transposed_times(left: torch.Tensor) -> tuple[torch.Tensor, float]:  # delta^T @ left, ||delta||^2
        out = torch.zeros(cols, left.shape[1], dtype=torch.float32)
        norm2 = 0.0
        for r0, r1, block in reader.blocks(target):
            out.addmm_(block.t(), left[r0:r1])
            norm2 += float(block.norm()) ** 2
        return out, norm2

    q = _orthonormal(times(omega))
    for _ in range(POWER_ITERATIONS):
        z, _ = transposed_times(q)
        q = _orthonormal(times(_orthonormal(z)))
    bt, norm2 = transposed_times(q)  # (Q^T delta)^T: cols x k
    u_small, s, vh_small = torch.linalg.svd(bt.double(), full_matrices=False)  # bt = U' S V'^T
    r = target.rank
    left = ((q.double() @ vh_small.t()[:, :r]) * s[:r]).float()  # Q V' S: rows x r
    right = u_small[:, :r].t().float().contiguous()  # U'^T: r x cols
    residual2 = 0.0  # measured, not derived from the norms (which cancel when the error is small)
    for r0, r1, block in reader.blocks(target):
        residual2 += float(block.addmm_(left[r0:r1], right, alpha=-1).norm()) ** 2
    return left, right, residual2, norm2


def choose_targets(finetuned, base, rank: int) -> tuple[list[Target], list[str], list[str]]:
    """(LoRA targets, 1-D tensors to save whole, differing tensors the adapter cannot hold); tensors are
    compared while reading (equal ones are left out)."""
    targets, whole, dropped = [], [], []
    for name, info in finetuned.tensors.items():
        other = base.tensors.get(name)
        if other is None or tuple(other.shape) != tuple(info.shape) or not info.is_float:
            if other is None or tuple(other.shape) != tuple(info.shape):
                dropped.append(name)
            continue
        if _equal(info, other):
            continue
        if len(info.shape) == 2 and name.endswith(".weight"):
            rows, cols = info.shape
            targets.append(Target(name[:-len(".weight")], info, other, min(rank, rows, cols),
                                  bool(EMBEDDING.search(name))))
        elif len(info.shape) == 1:
            whole.append(name)
        else:
            dropped.append(name)
    return targets, whole, dropped


def _equal(a: TensorInfo, b: TensorInfo, chunk: int = 1 << 22) -> bool:
    """Bit-equal values (views of the mappings: nothing is copied); tensors of different dtypes count as
    different."""
    if a.dtype != b.dtype:
        return False
    for start in range(0, a.numel, chunk):
        stop = min(a.numel, start + chunk)
        same = torch.equal(a.read(start, stop), b.read(start, stop))
        a.release(start, stop, drop_cache=False)
        b.release(start, stop, drop_cache=False)
        if not same:
            return False
    return True


def _task_type(directory: Path) -> str | None:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    architectures = config.get("architectures") or [] if isinstance(config, dict) else []
    return "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in architectures) else None


def extract_lora(finetuned_path: Path, base_path: Path, rank: int, output: Path, max_ram: int | None = None,
                 quiet: bool = False, seed: int = 0) -> dict:
    if rank < 1:
        raise ConfigError(f"--rank must be at least 1, got {rank}.")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise OutputError(f"output '{output}' exists and is not a directory; extract-lora writes a PEFT adapter "
                          f"directory ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}).")
    finetuned = open_checkpoint(finetuned_path)
    base = open_checkpoint(base_path)
    try:
        started = time.perf_counter()
        largest = max((max(i.shape) for i in finetuned.tensors.values() if len(i.shape) == 2), default=1)
        budget = Budget(max_ram, 3 * 4, DEFAULT_MAX_RAM, largest_tensor=max(
            (i.numel for i in finetuned.tensors.values()), default=1))
        with MemoryGuard(budget.limit) as guard:
            targets, whole, dropped = choose_targets(finetuned, base, rank)
            if not targets and not whole:
                raise StreamMergeError(f"{finetuned_path} and {base_path} hold the same values in every tensor they "
                                       "share: there is no difference to extract.")
            factors = 4 * (largest + rank + OVERSAMPLE) * (rank + OVERSAMPLE) * 4
            if budget.limit - budget.baseline < factors + budget.chunk_elements * budget.per_element:
                raise StreamMergeError(f"the SVD factors of the largest matrix need {format_size(factors)} beside "
                                       f"the row blocks; raise --max-ram above {format_size(budget.limit)}.")
            entries = [e for t in targets for e in t.entries()]
            entries += [(PREFIX + n, torch.float32, tuple(finetuned.tensors[n].shape)) for n in whole]
            out = make_output(output_spec(output / ADAPTER_WEIGHTS, entries, {"format": "pt"}))
            check_disk_space(output, out.total_size)
            reader = DeltaReader(budget.chunk_elements)
            residual = total = 0.0
            per_module = {}
            try:
                out.open()
                for index, target in enumerate(targets):
                    left, right, residual2, norm2 = truncated_svd(reader, target, seed + index)
                    residual, total = residual + residual2, total + norm2
                    per_module[target.module] = math.sqrt(residual2 / norm2) if norm2 else 0.0
                    (a_name, _, _), (b_name, _, _) = target.entries()
                    if target.embedding:
                        out.write(a_name, 0, left.t().contiguous().reshape(-1))
                        out.write(b_name, 0, right.t().contiguous().reshape(-1))
                    else:
                        out.write(a_name, 0, right.reshape(-1))
                        out.write(b_name, 0, left.reshape(-1))
                    guard.check(f"'{target.module}'")
                for name in whole:
                    out.write(PREFIX + name, 0, finetuned.tensors[name].read().float())
                out.commit()
            except BaseException:
                out.abort()
                raise
        modules_to_save = sorted({n.rsplit(".", 1)[0] for n in whole})
        reduced = {t.module: t.rank for t in targets if t.rank != rank}
        config = {
            "peft_type": "LORA", "task_type": _task_type(Path(finetuned_path)),
            "base_model_name_or_path": str(base_path), "r": rank, "lora_alpha": rank,
            "target_modules": sorted(t.module for t in targets), "modules_to_save": modules_to_save or None,
            "rank_pattern": {re.escape(m): r for m, r in reduced.items()},
            "alpha_pattern": {re.escape(m): r for m, r in reduced.items()},
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True,
        }
        write_atomically(output / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
        report = {
            "output": str(output), "rank": rank, "modules": len(targets), "modules_to_save": modules_to_save,
            "not_representable": dropped, "relative_error": math.sqrt(residual / total) if total else 0.0,
            "relative_error_per_module": per_module, "seconds": time.perf_counter() - started,
            "peak_anon_bytes": guard.peak, "max_ram_bytes": budget.limit,
        }
    finally:
        finetuned.close()
        base.close()
    if not quiet:
        print(f"extracted a rank-{rank} LoRA of {len(targets)} module(s) -> {output} "
              f"(relative Frobenius error of the weight differences {report['relative_error']:.3g}; "
              f"{len(modules_to_save)} module(s) saved whole) in {report['seconds']:.1f} s, peak anonymous RAM "
              f"{guard.peak / 2**20:.0f} MiB (budget {budget.limit / 2**20:.0f} MiB)", file=sys.stderr)
        if dropped:
            print(f"warning: {len(dropped)} tensor(s) differ but cannot be part of a LoRA adapter (left out): "
                  + ", ".join(dropped[:10]) + (" ..." if len(dropped) > 10 else ""), file=sys.stderr)
    return report


def add_extract_lora_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "extract-lora", help="write the difference of a fine-tune and its base as a PEFT LoRA adapter",
        description="Extract a rank-R LoRA adapter (PEFT layout) of FINETUNED - BASE by a streamed truncated SVD "
                    "per weight matrix, under a RAM budget.")
    p.add_argument("finetuned", type=Path, help="the fine-tuned checkpoint (file or Hugging Face directory)")
    p.add_argument("base", type=Path, help="the model it was fine-tuned from")
    p.add_argument("--rank", "-r", type=int, required=True, help="LoRA rank")
    p.add_argument("--output", "-o", type=Path, required=True, help="adapter directory to write")
    p.add_argument("--max-ram", type=size_argument, metavar="SIZE",
                   help="peak anonymous RAM budget (default 1GiB, capped by what is available)")
    p.add_argument("--quiet", "-q", action="store_true", help="no summary")
    p.add_argument("--report", type=Path, metavar="FILE.json", help="write the summary (errors per module) as JSON")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    report = extract_lora(args.finetuned, args.base, args.rank, args.output, args.max_ram, args.quiet)
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0
