"""Data: TF-free TFDS preparation (ImageNet-1k/ReaL/v2, CIFAR-100, Stanford Dogs, embedded
digits demo), grain input pipelines with the DeiT augmentation recipe, and on-device
Mixup/CutMix. See docs/data.md."""

from halluvit_jax.data.config import default_input_config, demo_input_config
from halluvit_jax.data.demo import DEMO_DATASET, prepare_demo
from halluvit_jax.data.mixup import mixup_cutmix, smooth_one_hot
from halluvit_jax.data.pipeline import (
    DATA_ITEM_NAME,
    create_eval_iter,
    create_train_iter,
    iterator_checkpoint_args_restore,
    iterator_checkpoint_args_save,
    num_classes,
    num_examples,
)
from halluvit_jax.data.tfds_utils import DatasetNotPreparedError, ManualDirError

__all__ = [
    "DATA_ITEM_NAME", "DEMO_DATASET", "DatasetNotPreparedError", "ManualDirError",
    "create_eval_iter", "create_train_iter", "default_input_config", "demo_input_config",
    "iterator_checkpoint_args_restore", "iterator_checkpoint_args_save", "mixup_cutmix",
    "num_classes", "num_examples", "prepare_demo", "smooth_one_hot",
]
