"""The compiled consensus kernels against the torch and numpy operations they replace: the same bits, edge values
included (the merges that run them are held to their references in `test_methods.py` and `test_tiles.py`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streammerge.kernels.consensus import add_by_sign, elect
from streammerge.methods.masks import INT_VIEW, compare


def by_operations(deltas: list[torch.Tensor], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign consensus as element-wise torch and numpy operations: (the elected sign's sum, its weight or 1)."""
    n, dtype = deltas[0].numel(), deltas[0].dtype
    positive, negative, weight_pos, weight_neg, scratch = (torch.zeros(n, dtype=dtype) for _ in range(5))
    for delta, weight in zip(deltas, weights):
        positive.add_(torch.clamp(delta, min=0, out=scratch))
        negative.add_(torch.clamp(delta, max=0, out=scratch))
        weight_pos.add_(torch.gt(delta, 0, out=scratch), alpha=weight)
        weight_neg.add_(torch.lt(delta, 0, out=scratch), alpha=weight)
    up = torch.empty(n, dtype=torch.bool)
    compare(np.greater_equal, torch.add(positive, negative), 0, up)
    weight = torch.where(up, weight_pos, weight_neg)
    return torch.where(up, positive, negative), weight.masked_fill_(weight == 0, 1)


def edge_values(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=generator, dtype=torch.float64).to(dtype)
    specials = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45], dtype=dtype)
    picks = torch.randint(0, 4 * len(specials), (n,), generator=generator)
    where = picks < len(specials)
    values[where] = specials[picks[where]]
    return values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1.0, -0.7], [0.1, 0.1, 0.1, 0.1, -0.4], [0.3]])
def test_consensus_kernels_give_the_bits_of_the_operations(dtype, weights):
    n = 50_000
    deltas = [edge_values(n, dtype, seed) for seed in range(len(weights))]
    deltas.append(deltas[0].neg())  # sums that cancel exactly
    weights = weights + [weights[0]]
    expected_sum, expected_weight = by_operations(deltas, weights)
    positive, negative, weight_pos, weight_neg, chosen, weight = (torch.zeros(n, dtype=dtype) for _ in range(6))
    for delta, w in zip(deltas, weights):
        add_by_sign(delta.numpy(), positive.numpy(), negative.numpy(), weight_pos.numpy(), weight_neg.numpy(), w)
    elect(positive.numpy(), negative.numpy(), weight_pos.numpy(), weight_neg.numpy(), chosen.numpy(),
          weight.numpy())
    bits = INT_VIEW[dtype]
    assert torch.equal(chosen.view(bits), expected_sum.view(bits))
    assert torch.equal(weight.view(bits), expected_weight.view(bits))
