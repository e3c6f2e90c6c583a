"""The Gram matrix of a tensor's vectors (one per model, each the whole flattened tensor), in one streaming pass.

Methods on the sphere (karcher, multislerp) only ever form linear combinations of their input vectors, so every
norm, angle and dot product they need is a quadratic form in these dot products: one statistics pass yields
all of them, in float64, summed per grid block (`GroupSums`) so they do not depend on the chunking. The merge
pass then applies one scalar coefficient per model.
"""

from __future__ import annotations

from typing import Callable

import torch

from streammerge.methods.method import GRID
from streammerge.methods.streaming import Groups, GroupSums


class Gram:
    """Float64 dot products <v_i, v_j> of n vectors, accumulated chunk by chunk."""

    def __init__(self, n: int, shape: tuple):
        self.n = n
        self.pairs = [(i, j) for i in range(n) for j in range(i, n)]
        self.sums = GroupSums(Groups("tensor", shape), len(self.pairs))

    def observe(self, vector: Callable[[int, torch.Tensor | None], torch.Tensor], offset: int, product: torch.Tensor,
                first: torch.Tensor | None = None, second: torch.Tensor | None = None) -> None:
        """vector(i, buffer): this chunk of v_i, a view or computed into `buffer` (first or second, chunk-sized
        scratch buffers that vectors computed on the fly need); product: chunk-sized scratch."""
        n = vector(0, first).numel()
        if n <= GRID:  # one grid block: the vectors side by side, every pair's products summed in one call
            rows = torch.empty(self.n, n, dtype=product.dtype)
            vectors = [vector(i, rows[i]) for i in range(self.n)]
            self.sums.add_each(offset, [torch.mul(vectors[i], vectors[j]) for i, j in self.pairs])
            return
        q = 0  # the pairs in the order of self.pairs
        for i in range(self.n):
            a = vector(i, first)
            for j in range(i, self.n):
                b = a if j == i else vector(j, second)
                self.sums.add(q, offset, torch.mul(a, b, out=product[:a.numel()]))
                q += 1

    def matrix(self) -> torch.Tensor:
        gram = torch.empty(self.n, self.n, dtype=torch.float64)
        for q, (i, j) in enumerate(self.pairs):
            gram[i, j] = gram[j, i] = self.sums.sums[q, 0]
        return gram


def quadratic_norm(gram: torch.Tensor, coefficients: torch.Tensor) -> float:
    """The norm of sum_i coefficients[i] * v_i, from the Gram matrix of the v_i."""
    return max(0.0, float(coefficients @ gram @ coefficients)) ** 0.5
