"""ram and ramplus_tl (Reinforced Agent Merging): average task-vector entries over the models that changed them.

mergekit 0.1.5's definitions, delta_i = model_i - base and an entry "changed" where |delta_i| > epsilon:
- ram: result = base + sum_i changed_i * delta_i / max(1, number of models that changed the entry); an entry
  only one model changed keeps that model's value, shared entries are averaged, unchanged ones stay at the base.
- ramplus_tl: as ram, but entries only model i changed are scaled by lambda_i = 1 + r * clamp(rho_i, 0, alpha),
  rho_i = (entries model i shares with others) / max(epsilon, entries only model i changed), counted over the
  whole tensor. The counts are integers gathered in one statistics pass, so they do not depend on the chunking.

Both passes are compiled element-wise kernels (`kernels.ram`), split between the merge's threads.
"""

from __future__ import annotations

import numpy as np
import torch

from streammerge.methods.method import ChunkContext, Method, Param, kernel_loader, per_segment
from streammerge.methods.streaming import KERNEL_GRAIN, in_parallel

EPSILON = Param("epsilon", 1e-5, "entries with |model - base| above this count as changed",
                check=lambda v: None if v >= 0 else "must be 0 or more")


def _arrays(ctx: ChunkContext) -> tuple[tuple[np.ndarray, ...], np.ndarray, np.floating]:
    """The models' and the base's elements, and epsilon in their dtype (as torch compares with a Python number)."""
    base = ctx.base.numpy()
    return tuple(x.numpy() for x in ctx.inputs), base, base.dtype.type(ctx.params["epsilon"])


def _merge(ctx: ChunkContext, scales: list[float] | None) -> torch.Tensor:
    """The merge of the chunk into ctx.out; with `scales`, ramplus_tl's rescaling of the entries one model changed."""
    from streammerge.kernels.ram import merge  # (numba: imported by the merges that use it)
    inputs, base, epsilon = _arrays(ctx)
    factors = np.array(scales if scales is not None else [1.0] * len(inputs), dtype=base.dtype)
    out = ctx.out.numpy()
    in_parallel(base.size, lambda a, z: merge(tuple(x[a:z] for x in inputs), base[a:z], epsilon, factors,
                                              scales is not None, out[a:z]), grain=KERNEL_GRAIN)
    return ctx.out


def ram(ctx: ChunkContext, _stats=None) -> torch.Tensor:
    return _merge(ctx, None)


class RamPlusStats:
    def __init__(self, n_models: int):
        self.counts = np.zeros((2, n_models), dtype=np.int64)  # per model: entries only it changed, shared ones
        self.scales: list[float] = []


def ramplus_observe(stats: RamPlusStats, pass_index: int, ctx: ChunkContext) -> None:
    from streammerge.kernels.ram import count_changes
    inputs, base, epsilon = _arrays(ctx)

    def count(a: int, z: int) -> np.ndarray:
        counts = np.zeros_like(stats.counts)  # (one per range: the threads add their own)
        count_changes(tuple(x[a:z] for x in inputs), base[a:z], epsilon, counts)
        return counts

    stats.counts += sum(in_parallel(base.size, count, grain=KERNEL_GRAIN))
    stats.params = ctx.params


def ramplus_finish(stats: RamPlusStats, pass_index: int) -> None:
    p = stats.params
    stats.scales = []
    for unique, shared in zip(*stats.counts.tolist()):
        # float32, as mergekit divides its integer counts
        rho = torch.tensor(shared, dtype=torch.float32) / torch.tensor(max(float(unique), p["epsilon"]),
                                                                       dtype=torch.float32)
        stats.scales.append(float(1 + p["r"] * rho.clamp(min=0, max=p["alpha"])))


def ramplus_tl(ctx: ChunkContext, stats: RamPlusStats) -> torch.Tensor:
    return _merge(ctx, stats.scales)


RAM = Method(
    name="ram",
    help="RAM: average each task-vector entry over the models that changed it (|delta| > epsilon)",
    merge=ram,
    params=(EPSILON,),
    needs_base=True, min_models=1, elementwise=True, load=kernel_loader("ram"),
)

RAMPLUS_TL = Method(
    name="ramplus_tl",
    help="RAM+ (tensor-local): as ram, entries only one model changed scaled by 1 + r * min(alpha, shared/unique)",
    merge=per_segment(ramplus_tl), segmented=True,
    params=(Param("r", 0.1, "strength of the rescaling of entries only one model changed"),
            Param("alpha", 0.2, "upper clamp of the shared/unique ratio"),
            EPSILON),
    needs_base=True, stat_passes=1, init_stats=lambda numel, n: RamPlusStats(n), observe=ramplus_observe,
    finish_pass=ramplus_finish, min_models=1, load=kernel_loader("ram"),
)

METHODS = (RAM, RAMPLUS_TL)
