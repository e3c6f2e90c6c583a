"""The Gram matrix of a tensor's vectors (one per model, each the whole flattened tensor), in one streaming pass.

Methods on the sphere (karcher, multislerp) only ever form linear combinations of their input vectors, so every
norm, angle and dot product they need is a quadratic form in these dot products: one statistics pass yields
all of them, in float64, summed per grid block (`GroupSums`) so they do not depend on the chunking. The merge
pass then applies one scalar coefficient per model.
"""

from __future__ import annotations

from typing import Callable

import torch

from streammerge.methods.streaming import Groups, GroupSums


class Gram:
    """Float64 dot products <v_i, v_j> of n vectors, accumulated chunk by chunk."""

    def __init__(self, n: int, shape: tuple):
        self.n = n
        self.pairs = [(i, j) for i in range(n) for j in range(i, n)]
        self.sums = GroupSums(Groups("tensor", shape), len(self.pairs))

    def observe(self, vector: Callable[[int, torch.Tensor | None], torch.Tensor], offset: int, n: int,
                product: torch.Tensor, first: torch.Tensor | None = None, second: torch.Tensor | None = None) -> None:
        """The n elements at `offset` of every v_i = vector(i, buffer): a view, or computed into `buffer` (first
        or second, chunk-sized scratch buffers that vectors computed on the fly need); product: chunk-sized
        scratch."""
        self.sums.add_products(offset, n, vector, self.pairs, product, first, second)

    def matrix(self) -> torch.Tensor:
        sums = dict(zip(self.pairs, self.sums.sums[:, 0].tolist()))
        return torch.tensor([[sums[min(i, j), max(i, j)] for j in range(self.n)] for i in range(self.n)],
                            dtype=torch.float64)


def quadratic_norm(gram: torch.Tensor, coefficients: torch.Tensor) -> float:
    """The norm of sum_i coefficients[i] * v_i, from the Gram matrix of the v_i."""
    return max(0.0, float(coefficients @ gram @ coefficients)) ** 0.5
