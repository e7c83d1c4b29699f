"""Data: TF-free TFDS preparation (ImageNet-1k/ReaL/v2, CIFAR-100, Stanford Dogs, embedded
digits demo), grain input pipelines with the DeiT augmentation recipe, and on-device
Mixup/CutMix. See docs/data.md.

The names below are imported on first use (PEP 562), so that ``halluvit_jax.data.mixup`` and
``halluvit_jax.data.ops`` (which the train step uses) import without TFDS and grain: a JAX
project that takes our train step but feeds its own data needs neither.
"""

from __future__ import annotations

from halluvit_jax.lazy import lazy_exports

_EXPORTS = {
    "default_input_config": "config", "demo_input_config": "config",
    "DEMO_DATASET": "demo", "prepare_demo": "demo",
    "mixup_cutmix": "mixup", "smooth_one_hot": "mixup",
    "DATA_ITEM_NAME": "pipeline", "create_eval_iter": "pipeline", "create_train_iter": "pipeline",
    "iterator_checkpoint_args_restore": "pipeline", "iterator_checkpoint_args_save": "pipeline",
    "num_classes": "pipeline", "num_examples": "pipeline",
    "DatasetNotPreparedError": "tfds_utils", "ManualDirError": "tfds_utils",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
