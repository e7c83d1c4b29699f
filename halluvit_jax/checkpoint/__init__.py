"""Checkpoint files: the one reader (:func:`read_checkpoint`), the writer of converted
directories, and the checks of variable trees.

* :mod:`halluvit_jax.checkpoint.io`: the layouts on disk, reading and writing them;
* :mod:`halluvit_jax.checkpoint.trees`: path layout, structure/shape comparison, finiteness;
* :mod:`halluvit_jax.checkpoint.errors`: the one-line errors.

``halluvit_jax.load`` (:mod:`halluvit_jax.loading`) builds the model on top of these; resume
and ``init_from`` (``train/checkpointing.py``) read through :func:`read_checkpoint` too.
"""

from halluvit_jax.checkpoint.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    NonFiniteCheckpointError,
)
from halluvit_jax.checkpoint.io import Checkpoint, read_checkpoint

__all__ = ["Checkpoint", "CheckpointError", "CheckpointMismatchError", "CheckpointNotFoundError",
           "CorruptCheckpointError", "NonFiniteCheckpointError", "read_checkpoint"]
