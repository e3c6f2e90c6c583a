"""Merge methods: one module per family of methods, each listing its `Method`s in a module-level `METHODS`.

`method` defines what a method is, `registry` finds the methods (every module of this package that has a
`METHODS`), `streaming` and `sparsifiers` hold the whole-tensor statistics and pruning rules they share.
"""
