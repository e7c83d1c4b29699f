"""The trainer: ``train_and_evaluate(config, workdir)`` and its pure building blocks."""

from halluvit_jax.train.trainer import (
    TrainState,
    create_model,
    create_train_state,
    cross_entropy,
    eval_step,
    train_and_evaluate,
    train_step,
)

__all__ = [
    "TrainState",
    "create_model",
    "create_train_state",
    "cross_entropy",
    "eval_step",
    "train_and_evaluate",
    "train_step",
]
