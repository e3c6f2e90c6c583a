"""Methods driven by angles and norms of whole tensors (or of their rows): slerp, nuslerp, model_stock.

One statistics pass sums squares and dot products per grid block in float64 (`GroupSums`, by the compiled
`kernels.pairwise`); the merge pass then applies scalar (or per-row) coefficients, so the result is the same
whatever the chunk size.
"""

from __future__ import annotations

import math

import torch

from streammerge.methods.method import ChunkContext, Method, Param, kernel_loader, per_segment
from streammerge.methods.streaming import Groups, GroupSums, group_stats_bytes, per_group

SLERP_LINEAR_DOT = 0.9995  # nearly parallel tensors: interpolate linearly (as mergekit does)
SLERP_MIN_NORM = 1e-8
NUSLERP_MIN_NORM = 1e-7
NUSLERP_EPS = 1e-8
STOCK_MIN_NORM_PRODUCT = 1e-6
STOCK_SINGULAR = 1e-6


class Stats:
    """Lazily set up on the first chunk (the method's parameters and the tensor's shape come with it)."""

    def __init__(self):
        self.sums: GroupSums | None = None
        self.groups: Groups | None = None
        self.coefficients = None
        self.dtype: torch.dtype | None = None  # the accumulation dtype


def _apply_coefficient(x: torch.Tensor, coefficient, groups: Groups, offset: int, buffer: torch.Tensor):
    """x *= coefficient, a float or one value per group."""
    if isinstance(coefficient, float):
        return x.mul_(coefficient)
    return x.mul_(groups.expand(coefficient.to(x.dtype), offset, buffer[:x.numel()]))


# -- slerp ---------------------------------------------------------------------------------------------------
def slerp_coefficients(t: float, norm_a: float, norm_b: float, dot: float) -> tuple[float, float]:
    """Spherical interpolation of the directions, applied to the unnormalized tensors (mergekit's convention)."""
    norm_a = norm_a if norm_a > SLERP_MIN_NORM else 1.0
    norm_b = norm_b if norm_b > SLERP_MIN_NORM else 1.0
    cosine = max(-1.0, min(1.0, dot / (norm_a * norm_b)))
    if abs(cosine) > SLERP_LINEAR_DOT:
        return 1 - t, t
    theta = math.acos(cosine)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


PAIR_PRODUCTS = ((0, 0), (1, 1), (0, 1))  # |a|^2, |b|^2, a.b


def slerp_observe(stats: Stats, pass_index: int, ctx: ChunkContext) -> None:
    if stats.sums is None:
        stats.sums = GroupSums(Groups("tensor", ctx.shape), 3, compiled=True)
    stats.sums.add_vector_products(ctx.offset, ctx.out.numel(), ctx.inputs[:2], None, PAIR_PRODUCTS, ctx.buffers[0])


def slerp_finish(stats: Stats, pass_index: int) -> None:
    stats.squares = stats.sums.sums[:, 0].tolist()


def slerp(ctx: ChunkContext, stats: Stats) -> torch.Tensor:
    aa, bb, ab = stats.squares
    coef_a, coef_b = slerp_coefficients(ctx.params["t"], math.sqrt(aa), math.sqrt(bb), ab)
    other = torch.mul(ctx.inputs[1], coef_b, out=ctx.buffers[0][:ctx.out.numel()])
    return torch.mul(ctx.inputs[0], coef_a, out=ctx.out).add_(other)


SLERP = Method(
    name="slerp",
    help="spherical interpolation from models[0] (t=0) to models[1] (t=1) over each whole tensor",
    merge=per_segment(slerp), segmented=True, tiled=True,
    params=(Param("t", 0.5, "interpolation factor: 0 gives models[0], 1 gives models[1]"),),
    stat_passes=1, init_stats=lambda numel, n: Stats(), observe=slerp_observe, finish_pass=slerp_finish,
    buffers=1, min_models=2, max_models=2, typical={"parameters": {"t": 0.4}}, load=kernel_loader("pairwise"),
)


# -- nuslerp -------------------------------------------------------------------------------------------------
def _nuslerp_groups(params: dict, shape: tuple) -> Groups:
    if params["nuslerp_flatten"]:
        return Groups("tensor", shape)
    return Groups("columns" if params["nuslerp_row_wise"] else "rows", shape)


def nuslerp_stats_bytes(params: dict, model_params: list[dict], dtype: torch.dtype, numel: int, shape: tuple) -> int:
    return group_stats_bytes(_nuslerp_groups(params, shape), 3 * 8 + 2 * dtype.itemsize)  # 3 sums, 2 coefficients


def _task_vectors(ctx: ChunkContext) -> tuple[torch.Tensor, torch.Tensor]:
    n = ctx.out.numel()
    if ctx.base is None:
        return ctx.inputs[0], ctx.inputs[1]
    return (torch.sub(ctx.inputs[0], ctx.base, out=ctx.buffers[0][:n]),
            torch.sub(ctx.inputs[1], ctx.base, out=ctx.buffers[1][:n]))


def nuslerp_observe(stats: Stats, pass_index: int, ctx: ChunkContext) -> None:
    if stats.sums is None:
        stats.sums = GroupSums(_nuslerp_groups(ctx.params, ctx.shape), 3, compiled=True)
        stats.groups, stats.dtype = stats.sums.groups, ctx.out.dtype
    stats.sums.add_vector_products(ctx.offset, ctx.out.numel(), ctx.inputs[:2], ctx.base, PAIR_PRODUCTS,
                                   ctx.buffers[2], *ctx.buffers[:2])


def nuslerp_coefficients(t: float, aa: torch.Tensor, bb: torch.Tensor, ab: torch.Tensor):
    norm_a = aa.sqrt().clamp(min=NUSLERP_MIN_NORM)
    norm_b = bb.sqrt().clamp(min=NUSLERP_MIN_NORM)
    cosine = (ab / (norm_a * norm_b)).clamp(-1, 1)
    colinear = (1 - cosine.square()) <= NUSLERP_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cosine))
    sin_theta = torch.where(colinear, 1, torch.sin(theta))
    coef_a = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return coef_a, coef_b


def nuslerp_finish(stats: Stats, pass_index: int) -> None:
    stats.squares, stats.sums = stats.sums.sums, None


def nuslerp_t(model_params: list[dict]) -> float:
    w0, w1 = model_params[0]["weight"], model_params[1]["weight"]
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def nuslerp(ctx: ChunkContext, stats: Stats) -> torch.Tensor:
    groups = stats.groups
    if stats.coefficients is None:  # (made at the first chunk, which brings the weights)
        t, squares = nuslerp_t(ctx.model_params), stats.squares
        if groups.count == 1:
            stats.coefficients = [c.item() for c in nuslerp_coefficients(t, *squares)]
        else:
            stats.coefficients = per_group(groups.count, stats.dtype,
                                           lambda g: nuslerp_coefficients(t, *(s[g] for s in squares)))
        stats.squares = None
    coef_a, coef_b = stats.coefficients
    a, b = _task_vectors(ctx)
    n = ctx.out.numel()
    if ctx.base is None:  # the inputs may be read-only file pages: work on copies
        a = ctx.buffers[0][:n].copy_(a)
        b = ctx.buffers[1][:n].copy_(b)
    _apply_coefficient(a, coef_a, groups, ctx.offset, ctx.buffers[2])
    _apply_coefficient(b, coef_b, groups, ctx.offset, ctx.buffers[2])
    if ctx.base is None:
        return torch.add(a, b, out=ctx.out)
    return torch.add(ctx.base, a.add_(b), out=ctx.out)


NUSLERP = Method(
    name="nuslerp",
    help="spherical interpolation with t = weight[1] / (weight[0] + weight[1]); of task vectors when a base is "
         "given; per tensor, per row or per column",
    merge=per_segment(nuslerp), segmented=True, tiled=True,
    params=(Param("weight", 1.0, "this model's weight (t = weight[1] / sum)", per_model=True),
            Param("nuslerp_flatten", True, "treat each tensor as one vector", kind=bool),
            Param("nuslerp_row_wise", False, "with nuslerp_flatten false: interpolate column vectors (along the "
                  "first dimension) instead of rows", kind=bool)),
    accepts_base=True, stat_passes=1, init_stats=lambda numel, n: Stats(), observe=nuslerp_observe,
    finish_pass=nuslerp_finish, buffers=3, stats_bytes=nuslerp_stats_bytes, min_models=2, max_models=2,
    load=kernel_loader("pairwise"),
)


# -- model_stock ---------------------------------------------------------------------------------------------
def _pairs(n: int):
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def stock_observe(stats: Stats, pass_index: int, ctx: ChunkContext) -> None:
    n_models = len(ctx.inputs)
    if stats.sums is None:
        groups = Groups("rows" if ctx.params["filter_wise"] else "tensor", ctx.shape)
        stats.sums = GroupSums(groups, n_models + len(_pairs(n_models)), compiled=True)
        stats.groups, stats.dtype, stats.n_models = groups, ctx.out.dtype, n_models
    n = ctx.out.numel()
    stats.sums.add_vector_products(ctx.offset, n, ctx.inputs, ctx.base,
                                   [(i, i) for i in range(n_models)] + _pairs(n_models), *ctx.buffers[:3])


def stock_ratio(sums: torch.Tensor, n_models: int) -> torch.Tensor:
    """Model Stock's interpolation ratio t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the
    task vectors; 0 (the base) where the denominator vanishes."""
    norms = sums[:n_models].sqrt()
    cosines = []
    for q, (i, j) in enumerate(_pairs(n_models)):
        cosines.append((sums[n_models + q] / (norms[i] * norms[j]).clamp(min=STOCK_MIN_NORM_PRODUCT)).clamp(-1, 1))
    cosine = torch.stack(cosines).mean(0)
    denominator = 1 + (n_models - 1) * cosine
    singular = denominator.abs() < STOCK_SINGULAR
    return torch.where(singular, 0, n_models * cosine / torch.where(singular, 1, denominator))


def stock_stats_bytes(params: dict, model_params: list[dict], dtype: torch.dtype, numel: int, shape: tuple) -> int:
    n = len(model_params)
    groups = Groups("rows" if params["filter_wise"] else "tensor", shape)
    return group_stats_bytes(groups, (n + len(_pairs(n))) * 8 + dtype.itemsize)  # norms and dot products, the ratio


def stock_finish(stats: Stats, pass_index: int) -> None:
    sums, stats.sums = stats.sums.sums, None
    if stats.groups.count == 1:  # (a float64 number: the merge takes it as a Python float)
        stats.ratio = stock_ratio(sums, stats.n_models)
    else:
        stats.ratio, = per_group(stats.groups.count, stats.dtype, lambda g: (stock_ratio(sums[:, g], stats.n_models),))


def model_stock(ctx: ChunkContext, stats: Stats) -> torch.Tensor:
    groups = stats.groups
    if groups.count == 1:  # one ratio: the torch operations below in one compiled pass (`kernels.stock`)
        from streammerge.kernels import stock  # (numba: loaded by the method)
        ratio = stats.ratio.item()
        # (on this thread: the tiles are small, and a dispatch to the merge's threads per tile cost more than the
        # second thread saved, where the writer keeps the other core busy)
        stock.merge(tuple(x.numpy() for x in ctx.inputs), ctx.base.numpy(), ratio, 1 - ratio, ctx.out.numpy())
        return ctx.out
    n = ctx.out.numel()
    out = ctx.out.copy_(ctx.inputs[0])
    for x in ctx.inputs[1:]:
        out.add_(x)
    out.div_(len(ctx.inputs))
    t, rest = ctx.buffers[0][:n], ctx.buffers[1][:n]
    groups.expand(stats.ratio, ctx.offset, t)  # (already in the accumulation dtype)
    out.mul_(t)
    return out.add_(torch.mul(ctx.base, t.neg_().add_(1), out=rest))


MODEL_STOCK = Method(
    name="model_stock",
    help="Model Stock: interpolate between the base and the models' average by their task vectors' angles",
    merge=per_segment(model_stock), segmented=True, tiled=True,
    params=(Param("filter_wise", False, "one ratio per row instead of per tensor", kind=bool),),
    needs_base=True, stat_passes=1, init_stats=lambda numel, n: Stats(), observe=stock_observe,
    finish_pass=stock_finish, buffers=3, stats_bytes=stock_stats_bytes, min_models=2,
    load=kernel_loader("pairwise", "stock"),
)

METHODS = (SLERP, NUSLERP, MODEL_STOCK)
