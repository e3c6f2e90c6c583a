"""ram and ramplus_tl (Reinforced Agent Merging): average task-vector entries over the models that changed them.

mergekit 0.1.5's definitions, delta_i = model_i - base and an entry "changed" where |delta_i| > epsilon:
- ram: result = base + sum_i changed_i * delta_i / max(1, number of models that changed the entry); an entry
  only one model changed keeps that model's value, shared entries are averaged, unchanged ones stay at the base.
- ramplus_tl: as ram, but entries only model i changed are scaled by lambda_i = 1 + r * clamp(rho_i, 0, alpha),
  rho_i = (entries model i shares with others) / max(epsilon, entries only model i changed), counted over the
  whole tensor. The counts are integers gathered in one statistics pass, so they do not depend on the chunking.
"""

from __future__ import annotations

import numpy as np
import torch

from streammerge.methods.masks import compare, select
from streammerge.methods.method import ChunkContext, Method, Param, per_segment

EPSILON = Param("epsilon", 1e-5, "entries with |model - base| above this count as changed",
                check=lambda v: None if v >= 0 else "must be 0 or more")


def _changes(ctx: ChunkContext, delta: torch.Tensor, changed: torch.Tensor, count: torch.Tensor, i: int):
    """delta = model i - base, zeroed where unchanged; changed (0/1 in the accumulation dtype); count += changed."""
    torch.sub(ctx.inputs[i], ctx.base, out=delta)
    torch.abs(delta, out=changed)
    torch.gt(changed, ctx.params["epsilon"], out=changed)
    delta.mul_(changed)
    count.add_(changed)


def _count(ctx: ChunkContext, buffers: list[torch.Tensor]) -> torch.Tensor:
    delta, changed, count = buffers
    count.zero_()
    for i in range(len(ctx.inputs)):
        torch.sub(ctx.inputs[i], ctx.base, out=delta).abs_()
        count.add_(torch.gt(delta, ctx.params["epsilon"], out=changed))
    return count


def ram(ctx: ChunkContext, _stats=None) -> torch.Tensor:
    n = ctx.out.numel()
    delta, changed, count = (s[:n] for s in ctx.buffers[:3])
    mixed = ctx.out.zero_()
    count.zero_()
    for i in range(len(ctx.inputs)):
        _changes(ctx, delta, changed, count, i)
        mixed.add_(delta)
    return mixed.div_(count.clamp_(min=1)).add_(ctx.base)


class RamPlusStats:
    def __init__(self, n_models: int):
        self.shared = [0] * n_models
        self.unique = [0] * n_models
        self.scales: list[float] = []


def ramplus_observe(stats: RamPlusStats, pass_index: int, ctx: ChunkContext) -> None:
    n = ctx.out.numel()
    delta, changed, count, flag = (s[:n] for s in ctx.buffers[:4])
    count = _count(ctx, [delta, changed, count])
    only = flag.view(torch.uint8)[:n].view(torch.bool)
    for i in range(len(ctx.inputs)):
        torch.sub(ctx.inputs[i], ctx.base, out=delta).abs_()
        torch.gt(delta, ctx.params["epsilon"], out=changed)
        torch.mul(changed, count, out=delta)  # count where model i changed the entry, else 0
        stats.unique[i] += int(np.count_nonzero(compare(np.equal, delta, 1, only).numpy()))
        stats.shared[i] += int(np.count_nonzero(compare(np.greater, delta, 1, only).numpy()))
    stats.params = ctx.params


def ramplus_finish(stats: RamPlusStats, pass_index: int) -> None:
    p = stats.params
    stats.scales = []
    for shared, unique in zip(stats.shared, stats.unique):
        # float32, as mergekit divides its integer counts
        rho = torch.tensor(shared, dtype=torch.float32) / torch.tensor(max(float(unique), p["epsilon"]),
                                                                       dtype=torch.float32)
        stats.scales.append(float(1 + p["r"] * rho.clamp(min=0, max=p["alpha"])))


def ramplus_tl(ctx: ChunkContext, stats: RamPlusStats) -> torch.Tensor:
    n = ctx.out.numel()
    delta, changed, count, scaled = (s[:n] for s in ctx.buffers[:4])
    shared = ctx.out.zero_()
    scaled.zero_()
    count.zero_()
    for i in range(len(ctx.inputs)):
        _changes(ctx, delta, changed, count, i)
        shared.add_(delta)
        scaled.add_(delta, alpha=stats.scales[i])
    only = changed.view(torch.uint8)[:n].view(torch.bool)
    compare(np.equal, count, 1, only)
    torch.div(shared, count.clamp_(min=1), out=delta)  # shared's average over the models that changed it
    return select(only, scaled, delta, ctx.out, count).add_(ctx.base)  # (count: scratch for the mask's bits)


RAM = Method(
    name="ram",
    help="RAM: average each task-vector entry over the models that changed it (|delta| > epsilon)",
    merge=ram,
    params=(EPSILON,),
    needs_base=True, buffers=3, min_models=1, elementwise=True, tiled=True,
)

RAMPLUS_TL = Method(
    name="ramplus_tl",
    help="RAM+ (tensor-local): as ram, entries only one model changed scaled by 1 + r * min(alpha, shared/unique)",
    merge=per_segment(ramplus_tl), segmented=True, tiled=True, tiled_statistics=True,
    params=(Param("r", 0.1, "strength of the rescaling of entries only one model changed"),
            Param("alpha", 0.2, "upper clamp of the shared/unique ratio"),
            EPSILON),
    needs_base=True, stat_passes=1, init_stats=lambda numel, n: RamPlusStats(n), observe=ramplus_observe,
    finish_pass=ramplus_finish, buffers=4, min_models=1,
)

METHODS = (RAM, RAMPLUS_TL)
