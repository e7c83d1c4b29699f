"""The trainer: ``train_and_evaluate(config, workdir)`` (``trainer.py``) and its pure building
blocks (``steps.py``)."""

from halluvit_jax.train.steps import (
    TrainState,
    create_model,
    create_train_state,
    cross_entropy,
    eval_step,
    train_step,
)
from halluvit_jax.train.trainer import train_and_evaluate

__all__ = [
    "TrainState",
    "create_model",
    "create_train_state",
    "cross_entropy",
    "eval_step",
    "train_and_evaluate",
    "train_step",
]
