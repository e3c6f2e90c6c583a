"""User-facing errors: each carries a one-paragraph message (what, where, what to do)."""

import reprlib


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


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 3, 60, 60
_SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxdict = _SHORT_REPR.maxset = 4


def short(value, limit: int = 80) -> str:
    """A repr of a user-supplied value for a message, bounded in length and in the time it takes (a value built
    from YAML aliases or a hostile file can be enormous once expanded: it is never expanded here)."""
    try:
        text = _SHORT_REPR.repr(value)
    except (ValueError, RecursionError):  # e.g. an int of more digits than Python converts to text
        text = f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[:limit - 3] + "..."
