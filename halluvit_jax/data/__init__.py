"""Data: TF-free TFDS preparation (ImageNet-1k/ReaL/v2, CIFAR-100, Stanford Dogs, embedded
digits demo), grain input pipelines with the DeiT augmentation recipe, and on-device
Mixup/CutMix. See docs/data.md.

The names below are imported on first use (PEP 562), so that ``halluvit_jax.data.mixup`` and
``halluvit_jax.data.ops`` (which the train step uses) import without TFDS and grain: a JAX
project that takes our train step but feeds its own data needs neither.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "default_input_config": "config", "demo_input_config": "config",
    "DEMO_DATASET": "demo", "prepare_demo": "demo",
    "mixup_cutmix": "mixup", "smooth_one_hot": "mixup",
    "DATA_ITEM_NAME": "pipeline", "create_eval_iter": "pipeline", "create_train_iter": "pipeline",
    "iterator_checkpoint_args_restore": "pipeline", "iterator_checkpoint_args_save": "pipeline",
    "num_classes": "pipeline", "num_examples": "pipeline",
    "DatasetNotPreparedError": "tfds_utils", "ManualDirError": "tfds_utils",
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
