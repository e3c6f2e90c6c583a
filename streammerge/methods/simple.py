"""Methods without statistics: passthrough (copy one model, optionally scaled) and add_difference."""

from __future__ import annotations

import torch

from streammerge.methods.method import ChunkContext, Method, Param


def passthrough(ctx: ChunkContext, _stats=None) -> torch.Tensor:
    scale = ctx.model_params[0]["scale"]
    if scale == 1:
        return ctx.out.copy_(ctx.inputs[0])
    return torch.mul(ctx.inputs[0], scale, out=ctx.out)


PASSTHROUGH = Method(
    name="passthrough",
    help="copy the single model's tensors (optionally scaled); e.g. to change dtype or layout",
    merge=passthrough,
    params=(Param("scale", 1.0, "multiply the tensors by this", per_model=True),),
    min_models=1, max_models=1, elementwise=True,
)


def add_difference(ctx: ChunkContext, _stats=None) -> torch.Tensor:
    a, b, c = ctx.inputs
    difference = torch.sub(b, c, out=ctx.out)
    return difference.mul_(ctx.params["alpha"]).add_(a)


ADD_DIFFERENCE = Method(
    name="add_difference",
    help="models[0] + alpha * (models[1] - models[2]): the Stable Diffusion mergers' \"add difference\"",
    merge=add_difference,
    params=(Param("alpha", 1.0, "multiplier of the difference"),),
    min_models=3, max_models=3, in_mergekit=False, typical={"parameters": {"alpha": 0.5}}, elementwise=True,
)

METHODS = (PASSTHROUGH, ADD_DIFFERENCE)
