"""streammerge: merge large checkpoints chunk by chunk under a hard RAM budget."""

__version__ = "0.1.0"
