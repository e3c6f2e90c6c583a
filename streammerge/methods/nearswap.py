"""nearswap: take the model's value where it is near the base's, keep the base's where they are far apart.

mergekit 0.1.5's definition, element by element: w = clamp(t / max(|base - x|, 1e-6), 0, 1) and
result = w * x + (1 - w) * base, so differences up to `t` take the model's value and larger ones move from the
base towards the model by t / |difference|. No statistics: each chunk is merged on its own.
"""

from __future__ import annotations

import torch

from streammerge.methods.method import ChunkContext, Method, Param

MIN_DIFFERENCE = 1e-6


def nearswap(ctx: ChunkContext, _stats=None) -> torch.Tensor:
    a, b = ctx.base, ctx.inputs[0]
    n = ctx.out.numel()
    weight, rest = ctx.buffers[0][:n], ctx.buffers[1][:n]
    torch.sub(a, b, out=weight).abs_().clamp_(min=MIN_DIFFERENCE)
    # t / d computed as reciprocal(d) * t, as torch evaluates the scalar-over-tensor division mergekit writes
    weight.reciprocal_().mul_(ctx.params["t"]).clamp_(0, 1)
    torch.mul(weight, b, out=ctx.out)
    torch.sub(1, weight, out=rest).mul_(a)
    return ctx.out.add_(rest)


def _check(params: dict, model_params: list[dict]) -> str | None:
    if params["t"] is None:
        return "nearswap needs `t` (the distance below which the model's value is taken), e.g. t: 0.0001"
    return None


NEARSWAP = Method(
    name="nearswap",
    help="per element: the model's value where it is within t of the base, else the base moved towards it by "
         "t / distance",
    merge=nearswap,
    params=(Param("t", None, "distance to the base below which the model's value is taken (required)",
                  check=lambda v: None if v >= 0 else "must be 0 or more"),),
    needs_base=True, buffers=2, check=_check, min_models=1, max_models=1, elementwise=True, tiled=True,
    typical={"parameters": {"t": 0.001}},
)

METHODS = (NEARSWAP,)
