"""The trainer: ``train_and_evaluate(config, workdir)`` (``trainer.py``) and its pure building
blocks (``steps.py``).

The names below are imported on first use (PEP 562): ``halluvit_jax.train.steps`` (the train
and eval steps, for a JAX project with its own loop) imports without the input pipeline
(grain, TFDS) that ``train_and_evaluate`` needs.
"""

from __future__ import annotations

from halluvit_jax.lazy import lazy_exports

_EXPORTS = {
    "TrainState": "steps", "create_model": "steps", "create_train_state": "steps",
    "cross_entropy": "steps", "eval_step": "steps", "train_step": "steps",
    "train_and_evaluate": "trainer",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
