"""The errors of reading a checkpoint: each one line on the command line (exit status 1)."""

from __future__ import annotations

from halluvit_jax.cli import UserError


class CheckpointError(UserError):
    """A checkpoint cannot be used as asked (one line, exit status 1)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint at the path (or not the requested step)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files are missing or unreadable (a partial or damaged step)."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint's variables do not fit the model (structure or shapes)."""


class NonFiniteCheckpointError(CheckpointError, ValueError):
    """The checkpoint holds NaN or Inf values."""


def describe(err: BaseException) -> str:
    """``'TypeName: first 160 characters of the message'`` of a library error, on one line."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:160]}"
