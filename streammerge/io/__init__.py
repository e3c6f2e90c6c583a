"""Readers and writers. Importing this package registers every format."""

from streammerge.io import safetensors_io, sharded, torch_legacy, torch_zip  # noqa: F401  (registration)
from streammerge.io.checkpoint import FORMATS, Checkpoint, open_checkpoint  # noqa: F401
from streammerge.io.mapped import TensorInfo  # noqa: F401
