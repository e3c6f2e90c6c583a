"""Compiled kernels (numba) for the math that op-at-a-time torch and numpy make slow; imported only by the merges
that use them."""
