"""Weighted average: sum_i w_i * x_i, divided by sum_i w_i when `normalize` is on."""

from __future__ import annotations

import torch

from streammerge.methods.method import ChunkContext, Method, Param


def normalized_weights(weights: list[float], normalize: bool) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights] if normalize else list(weights)


def linear(ctx: ChunkContext, _stats=None):
    weights = normalized_weights([p["weight"] for p in ctx.model_params], ctx.params["normalize"])
    out = torch.mul(ctx.inputs[0], weights[0], out=ctx.out)
    for x, w in zip(ctx.inputs[1:], weights[1:]):
        out.add_(x, alpha=w)
    return out


LINEAR = Method(
    name="linear",
    help="weighted average of the models (model soup)",
    merge=linear,
    elementwise=True,
    tiled=True,
    params=(
        Param("weight", 1.0, "this model's weight", per_model=True),
        Param("normalize", True, "divide by the sum of the weights", kind=bool),
    ),
)

METHODS = (LINEAR,)
