"""karcher: the Karcher (Riemannian) mean of the models' directions on the unit sphere, scaled by their mean norm.

mergekit 0.1.5's definition: equal weights 1/N; directions u_i = x_i / |x_i| of the models whose norm exceeds
`tol`; start from the normalized Euclidean mean of those directions; then up to `max_iter` gradient steps on the
sphere (log map: theta_i / sin(theta_i) * (u_i - cos(theta_i) * mean) summed with the weights, skipping
directions within `tol` of the mean; exp map back; stop when the step is shorter than `tol`); the result is
that direction times sum_i |x_i| / N.

Every vector the iteration forms is a linear combination of the u_i, so it runs on coefficients: one statistics
pass gathers the Gram matrix of the models (float64, per grid block), the iteration works on that N x N matrix,
and the merge pass adds the models with one coefficient each.
"""

from __future__ import annotations

import math

import torch

from streammerge.methods.method import ChunkContext, Method, Param, kernel_loader, per_segment
from streammerge.methods.gram import Gram, clamp, divide, mat_vec, quadratic_norm, root_of_clamped


def karcher_coefficients(gram: list[list[float]], max_iter: int, tol: float) -> list[float]:
    """c such that sum_i c_i x_i is the scaled Karcher mean, from the Gram matrix of the x_i."""
    n = len(gram)
    norms = [root_of_clamped(gram[i][i]) for i in range(n)]
    coefficients = [0.0] * n
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return coefficients
    valid_norms = [norms[i] for i in valid]
    units = [[divide(gram[i][j], valid_norms[a] * valid_norms[b]) for b, j in enumerate(valid)]
             for a, i in enumerate(valid)]  # Gram matrix of the u_i
    alpha = 1.0 / len(valid)
    mean = [alpha] * len(valid)  # coefficients over the u_i
    mean_norm = quadratic_norm(units, mean)
    mean = ([1.0] + [0.0] * (len(valid) - 1) if mean_norm < tol else [divide(m, mean_norm) for m in mean])
    for _ in range(max_iter):
        dots = [clamp(d, -1.0, 1.0) for d in mat_vec(units, mean)]
        tangent = [0.0] * len(valid)
        for k, dot in enumerate(dots):
            theta = math.acos(dot)
            if theta < tol:
                continue
            step = alpha * divide(theta, math.sin(theta))
            tangent = [t + step * ((1.0 if e == k else 0.0) - dot * m) for e, (t, m) in enumerate(zip(tangent, mean))]
        tangent_norm = quadratic_norm(units, tangent)
        if tangent_norm < tol:
            break
        cos, sin = math.cos(tangent_norm), math.sin(tangent_norm)
        direction = [divide(t, tangent_norm) for t in tangent]
        mean = [cos * m + sin * d for m, d in zip(mean, direction)]
        unit_norm = quadratic_norm(units, mean)
        if unit_norm > tol:
            mean = [m / unit_norm for m in mean]
    scale = sum(norms) / n  # every model's norm, as mergekit weighs them (1/N each)
    for i, m, norm in zip(valid, mean, valid_norms):
        coefficients[i] = scale * m / norm
    return coefficients


class KarcherStats:
    def __init__(self):
        self.gram: Gram | None = None
        self.coefficients: list[float] = []


def karcher_observe(stats: KarcherStats, pass_index: int, ctx: ChunkContext) -> None:
    if stats.gram is None:
        stats.gram = Gram(len(ctx.inputs), ctx.shape)
        stats.params = ctx.params
    stats.gram.observe(ctx.inputs, None, ctx.offset, ctx.out.numel(), ctx.buffers[0])


def karcher_finish(stats: KarcherStats, pass_index: int) -> None:
    stats.coefficients = karcher_coefficients(stats.gram.matrix(), stats.params["max_iter"], stats.params["tol"])


def karcher(ctx: ChunkContext, stats: KarcherStats | None) -> torch.Tensor:
    if stats is None:  # a single model is its own mean
        return ctx.out.copy_(ctx.inputs[0])
    out = torch.mul(ctx.inputs[0], stats.coefficients[0], out=ctx.out)
    for x, c in zip(ctx.inputs[1:], stats.coefficients[1:]):
        out.add_(x, alpha=c)
    return out


def _non_negative(value) -> str | None:
    return None if value >= 0 else "must be 0 or more"


KARCHER = Method(
    name="karcher",
    help="Karcher mean: the models' average direction on the unit sphere (iterated), times their mean norm",
    merge=per_segment(karcher), segmented=True, tiled=True,
    params=(Param("max_iter", 10, "most iterations of the Riemannian mean", kind=int, check=_non_negative),
            Param("tol", 1e-5, "convergence tolerance (also the smallest norm that counts as a direction)",
                  check=_non_negative)),
    stat_passes=lambda params, model_params, dtype, numel, shape: 1 if len(model_params) > 1 else 0,
    init_stats=lambda numel, n: KarcherStats(), observe=karcher_observe, finish_pass=karcher_finish,
    buffers=1, min_models=1, load=kernel_loader("pairwise"),
)

METHODS = (KARCHER,)
