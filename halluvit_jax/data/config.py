"""Input-pipeline configuration (``ml_collections.ConfigDict``).

Every field is documented in :func:`default_input_config`; the ops syntax is documented in
:mod:`halluvit_jax.data.ops` and ``docs/data.md``.
"""

from __future__ import annotations

import ml_collections

from halluvit_jax.data import demo
from halluvit_jax.models.registry import IMAGENET_MEAN, IMAGENET_STD


#: DeiT train recipe: RandomResizedCrop(0.08-1, bicubic) -> hflip -> RandAugment -> normalize ->
#: RandomErasing. ``randaug``/``erase`` read their settings from ``randaugment``/``random_erase``.
DEIT_TRAIN_OPS = "rrc(scale=0.08-1)|flip|randaug|normalize|erase"
#: timm eval: resize shorter side to floor(image_size / crop_pct) (bicubic) + center crop.
DEFAULT_EVAL_OPS = "resize_crop|normalize"


def default_input_config() -> ml_collections.ConfigDict:
    """Default (DeiT / ImageNet-1k at 224) input configuration.

    Fields:
      dataset: TFDS name ('imagenet2012', 'halluvit_digits' (the demo), or any prepared TFDS
        dataset with 'image' (encoded) and 'label' features).
      data_dir: TFDS data dir holding the prepared dataset (None: TFDS default,
        ``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``).
      train_split / eval_split: TFDS split names (slices like 'train[:1%]' work).
      image_size: output side in pixels (square).
      crop_pct: eval center-crop fraction: images are resized so their shorter side is
        ``floor(image_size / crop_pct)`` and the center ``image_size`` window is taken.
      mean / std: per-channel RGB normalization in [0, 1] units (op ``normalize``).
      interpolation: resampling of crops/resizes and RandAugment geometry ('bicubic',
        'bilinear', 'nearest', 'area', 'lanczos').
      train_ops / eval_ops: the per-image ops, a '|'-separated string or a list of op strings,
        e.g. 'rrc(scale=0.35-1)|normalize'. See :mod:`halluvit_jax.data.ops`.
      randaugment: timm RandAugment config used by op ``randaug`` ('' or None disables it).
      random_erase: probability of timm RandomErasing (pixel mode) used by op ``erase`` (0
        disables it).
      mixup / cutmix: Beta-distribution alphas for Mixup / CutMix (0 disables each); applied on
        device by :func:`halluvit_jax.data.mixup.mixup_cutmix` inside the train step.
      mixup_prob: probability of applying Mixup/CutMix to a batch.
      mixup_switch_prob: probability of CutMix instead of Mixup when both are enabled.
      label_smoothing: label smoothing of the (mixed) one-hot targets.
      repeated_aug: 0 = off, else each sampled image is repeated this many times per epoch
        (DeiT's RASampler, typically 3) -- every repeat gets its own augmentation; the epoch
        length stays ``len(split)``.
      num_threads: grain in-process reader/preprocessing threads (threads beat worker processes
        on small hosts; OpenCV releases the GIL).
      prefetch_buffer_size: elements prefetched by those threads.
      shuffle_seed: seed of the per-epoch shuffle (None: use the ``seed`` passed to
        ``create_train_iter``). Augmentation randomness always uses that ``seed``.
    """
    c = ml_collections.ConfigDict()
    c.dataset = "imagenet2012"
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.train_split = "train"
    c.eval_split = "validation"
    c.image_size = 224
    c.crop_pct = 0.875
    c.mean = IMAGENET_MEAN
    c.std = IMAGENET_STD
    c.interpolation = "bicubic"
    c.train_ops = DEIT_TRAIN_OPS
    c.eval_ops = DEFAULT_EVAL_OPS
    c.randaugment = "rand-m9-mstd0.5-inc1"
    c.random_erase = 0.25
    c.mixup = 0.8
    c.cutmix = 1.0
    c.mixup_prob = 1.0
    c.mixup_switch_prob = 0.5
    c.label_smoothing = 0.1
    c.repeated_aug = 0
    c.num_threads = 16
    c.prefetch_buffer_size = 256
    c.shuffle_seed = ml_collections.FieldReference(None, field_type=int)
    return c


def demo_input_config(data_dir: str | None = None) -> ml_collections.ConfigDict:
    """Input config for the embedded digits demo (32x32, light augmentation, no flip)."""
    c = default_input_config()
    c.dataset = demo.DEMO_DATASET
    c.data_dir = data_dir
    c.image_size = demo.DEMO_IMAGE_SIZE
    c.crop_pct = 1.0
    c.mean = demo.DEMO_MEAN
    c.std = demo.DEMO_STD
    c.train_ops = "rrc(scale=0.35-1)|normalize"
    c.randaugment = ""
    c.random_erase = 0.0
    c.mixup = 0.0
    c.cutmix = 0.0
    c.label_smoothing = 0.0
    c.num_threads = 4
    c.prefetch_buffer_size = 64
    return c
