"""multislerp: weighted interpolation of any number of models on the hypersphere (of task vectors with a base).

mergekit 0.1.5's definition, v_i the models (minus the base when one is given) flattened, w the weights (divided
by their sum with `normalize_weights`): u_i = v_i / (|v_i| + eps); the weighted mean of the u_i, normalized, is
the point of tangency m; the tangent vectors u_i - <u_i, m> m are averaged with the weights into t; the result
is exp_m(t) = m cos|t| + t sin|t| / |t| (|t| taken + eps), times sum_i w_i |v_i|, plus the base. One model is
returned as it is; when the weighted mean of the directions vanishes, two models are averaged linearly and
more are an error.

All of it is linear in the v_i, so one statistics pass gathers their Gram matrix (float64, per grid block) and
the merge pass adds the v_i with one coefficient each.
"""

from __future__ import annotations

import math

import torch

from streammerge.errors import StreamMergeError
from streammerge.methods.method import ChunkContext, Method, Param, kernel_loader, per_segment
from streammerge.methods.gram import Gram, divide, dot, mat_vec, quadratic_norm, root_of_clamped


def multislerp_coefficients(gram: list[list[float]], weights: list[float], normalize: bool, eps: float,
                            name: str = "") -> list[float]:
    """c such that sum_i c_i v_i is the interpolated vector, from the Gram matrix of the v_i."""
    w = list(weights)
    if normalize:
        total = sum(w)
        w = [divide(x, total) for x in w]
    norms = [root_of_clamped(gram[i][i]) for i in range(len(gram))]
    scale = [divide(1.0, norm + eps) for norm in norms]  # v_i -> u_i
    units = [[g * a * b for g, b in zip(row, scale)] for row, a in zip(gram, scale)]  # Gram matrix of the u_i
    mean_norm = quadratic_norm(units, w)
    if mean_norm < eps:
        if len(weights) == 2:
            return w
        raise StreamMergeError(
            f"multislerp: the weighted mean of the models' directions is zero for '{name}' (models pointing in "
            "opposite directions with weights that balance out); change the weights, or merge that tensor with "
            "another method through a rule.")
    mean = [divide(x, mean_norm) for x in w]  # coefficients over the u_i
    along = dot(w, mat_vec(units, mean))
    tangent = [x - along * m for x, m in zip(w, mean)]
    tangent_norm = quadratic_norm(units, tangent) + eps
    cos, sin_over_norm = math.cos(tangent_norm), divide(math.sin(tangent_norm), tangent_norm)
    average_norm = dot(norms, w)
    return [(m * cos + t * sin_over_norm) * average_norm * s for m, t, s in zip(mean, tangent, scale)]


class MultislerpStats:
    def __init__(self):
        self.gram: Gram | None = None
        self.coefficients: list[float] = []


def multislerp_observe(stats: MultislerpStats, pass_index: int, ctx: ChunkContext) -> None:
    if stats.gram is None:
        stats.gram = Gram(len(ctx.inputs), ctx.shape)
        stats.params, stats.model_params, stats.name = ctx.params, ctx.model_params, ctx.name
    stats.gram.observe(ctx.inputs, ctx.base, ctx.offset, ctx.out.numel(), *ctx.buffers[:3])


def multislerp_finish(stats: MultislerpStats, pass_index: int) -> None:
    stats.coefficients = multislerp_coefficients(
        stats.gram.matrix(), [m["weight"] for m in stats.model_params], stats.params["normalize_weights"],
        stats.params["eps"], stats.name)


def multislerp(ctx: ChunkContext, stats: MultislerpStats | None) -> torch.Tensor:
    if stats is None:  # one model is returned as it is
        return ctx.out.copy_(ctx.inputs[0])
    n = ctx.out.numel()
    out = ctx.out.zero_()
    for x, c in zip(ctx.inputs, stats.coefficients):
        v = x if ctx.base is None else torch.sub(x, ctx.base, out=ctx.buffers[0][:n])
        out.add_(v, alpha=c)
    return out if ctx.base is None else out.add_(ctx.base)


def _check(params: dict, model_params: list[dict]) -> str | None:
    if params["normalize_weights"] and len(model_params) > 1 and abs(sum(m["weight"] for m in model_params)) < 1e-12:
        return "multislerp: the weights sum to zero, so they cannot be normalized; change a weight or set " \
               "normalize_weights: false"
    return None


MULTISLERP = Method(
    name="multislerp",
    help="spherical interpolation of any number of models with weights (barycentric, via the tangent space at "
         "their mean direction); of task vectors when a base is given",
    merge=per_segment(multislerp), segmented=True, tiled=True,
    params=(Param("weight", 1.0, "this model's weight", per_model=True),
            Param("normalize_weights", True, "divide the weights by their sum", kind=bool),
            Param("eps", 1e-8, "small constant added to norms", check=lambda v: None if v >= 0 else "must be 0 or "
                  "more")),
    accepts_base=True,
    stat_passes=lambda params, model_params, dtype, numel, shape: 1 if len(model_params) > 1 else 0,
    init_stats=lambda numel, n: MultislerpStats(), observe=multislerp_observe, finish_pass=multislerp_finish,
    buffers=3, check=_check, min_models=1, load=kernel_loader("pairwise"),
)

METHODS = (MULTISLERP,)
