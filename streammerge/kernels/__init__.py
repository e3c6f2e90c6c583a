"""Compiled kernels (numba) for the math that op-at-a-time torch and numpy make slow: each fuses what would be
several passes over a buffer into one. Imported only by the merges that use them (`Method.load`)."""

from numba import njit

# compiled once per machine (numba's cache beside each module, or its user-wide one where that is read-only)
compiled = njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
