"""The Gram matrix of a tensor's vectors (one per model, each the whole flattened tensor), in one streaming pass.

Methods on the sphere (karcher, multislerp) only ever form linear combinations of their input vectors, so every
norm, angle and dot product they need is a quadratic form in these dot products: one statistics pass yields
all of them, in float64, summed per grid block (`GroupSums`) so they do not depend on the chunking. The merge
pass then applies one scalar coefficient per model.

The algebra on the N x N matrix runs on Python floats, in a fixed order of IEEE double operations: the same bits
on every machine (a BLAS product of tiny matrices may fuse or reorder its operations by CPU), without a tensor
operation's overhead for each of a few dozen numbers, which dominated for small tensors.
"""

from __future__ import annotations

import math

import torch

from streammerge.methods.streaming import Groups, GroupSums


class Gram:
    """Float64 dot products <v_i, v_j> of n vectors, accumulated chunk by chunk."""

    def __init__(self, n: int, shape: tuple):
        self.n = n
        self.pairs = [(i, j) for i in range(n) for j in range(i, n)]
        self.sums = GroupSums(Groups("tensor", shape), len(self.pairs), compiled=True)  # (`kernels.pairwise`)

    def observe(self, inputs: list[torch.Tensor], base: torch.Tensor | None, offset: int, n: int,
                product: torch.Tensor, first: torch.Tensor | None = None, second: torch.Tensor | None = None) -> None:
        """The n elements at `offset` of every v_i = inputs[i] - base, or inputs[i] where base is None (first and
        second: chunk-sized scratch for the differences, where they are made in arrays; product: chunk-sized
        scratch)."""
        self.sums.add_vector_products(offset, n, inputs, base, self.pairs, product, first, second)

    def matrix(self) -> list[list[float]]:
        sums = dict(zip(self.pairs, self.sums.sums[:, 0].tolist()))
        return [[sums[min(i, j), max(i, j)] for j in range(self.n)] for i in range(self.n)]


def dot(a: list[float], b: list[float]) -> float:
    total = 0.0
    for x, y in zip(a, b):
        total += x * y
    return total


def mat_vec(matrix: list[list[float]], vector: list[float]) -> list[float]:
    return [dot(row, vector) for row in matrix]


def quadratic_norm(gram: list[list[float]], coefficients: list[float]) -> float:
    """The norm of sum_i coefficients[i] * v_i, from the Gram matrix of the v_i."""
    return max(0.0, dot(coefficients, mat_vec(gram, coefficients))) ** 0.5


def divide(a: float, b: float) -> float:
    """a / b with IEEE's results for a zero divisor (inf, -inf or NaN), as a tensor division gives them."""
    if b:
        return a / b
    if a != a or not a:
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def clamp(x: float, low: float, high: float) -> float:
    """x limited to [low, high]; NaN stays NaN (as torch.clamp keeps it)."""
    return x if x != x else min(max(x, low), high)


def root_of_clamped(x: float) -> float:
    """sqrt(max(x, 0)); NaN stays NaN."""
    return x if x != x else math.sqrt(max(x, 0.0))
