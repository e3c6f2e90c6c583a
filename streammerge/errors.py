"""User-facing errors: each carries a one-paragraph message (what, where, what to do)."""


class StreamMergeError(Exception):
    """An error caused by the user's input or environment; printed without a traceback."""


class ConfigError(StreamMergeError):
    pass


class CheckpointError(StreamMergeError):
    """A checkpoint file cannot be read or is malformed."""


class NoWeightsError(CheckpointError):
    """A readable file that holds no model weights (training arguments, optimizer state only, ...)."""


class PlanError(StreamMergeError):
    """The inputs cannot be merged as asked (names, shapes, dtypes, rules)."""


class MemoryBudgetError(StreamMergeError):
    """The RAM budget is too small, unavailable, or was exceeded mid-run."""


class OutputError(StreamMergeError):
    """The output cannot be written (path, disk space)."""
