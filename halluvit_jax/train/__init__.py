"""The trainer: ``train_and_evaluate(config, workdir)`` (``trainer.py``) and its pure building
blocks (``steps.py``).

The names below are imported on first use (PEP 562): ``halluvit_jax.train.steps`` (the train
and eval steps, for a JAX project with its own loop) imports without the input pipeline
(grain, TFDS) that ``train_and_evaluate`` needs.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainState": "steps", "create_model": "steps", "create_train_state": "steps",
    "cross_entropy": "steps", "eval_step": "steps", "train_step": "steps",
    "train_and_evaluate": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
