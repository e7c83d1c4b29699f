"""The embedded demo dataset: scikit-learn's handwritten digits as a TFDS ArrayRecord dataset.

scikit-learn ships the UCI "optical recognition of handwritten digits" set (1797 real 8x8
grayscale scans, 16 gray levels) inside its wheel, so nothing is downloaded. The builder
upscales each digit to 32x32 (bicubic), replicates it to RGB, stores it PNG-encoded through the
standard ``tfds.features.Image`` feature and writes ArrayRecord through the same
:func:`halluvit_jax.data.tfds_utils.prepare_builder` path as ImageNet. The train/validation split
is a fixed permutation (seed 0): 1500 train / 297 validation.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import cv2
import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from halluvit_jax.data import tfds_utils, transforms

logger = logging.getLogger("halluvit_jax.data")

#: TFDS name of the demo dataset.
DEMO_DATASET = "halluvit_digits"
#: Stored image side (pixels).
DEMO_IMAGE_SIZE = 32
DEMO_NUM_TRAIN = 1500
DEMO_NUM_VALIDATION = 297
#: Mean/std of the stored demo images (RGB, in [0, 1]) -- use these for normalization.
DEMO_MEAN = (0.3125, 0.3125, 0.3125)
DEMO_STD = (0.3560, 0.3560, 0.3560)


def digits():
    """scikit-learn's digits: float64 images ``[1797, 8, 8]`` in [0, 16] and int labels ``[1797]``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def upscale_digit(img8: np.ndarray, size: int = DEMO_IMAGE_SIZE) -> np.ndarray:
    """[8, 8] digit with values in [0, 16] -> [size, size, 3] uint8 RGB (bicubic)."""
    x = np.asarray(img8, np.float32) * (255.0 / 16.0)
    x = cv2.resize(x, (size, size), interpolation=cv2.INTER_CUBIC)
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return np.repeat(x[:, :, None], 3, axis=2)


def split_indices() -> dict[str, np.ndarray]:
    """The fixed, deterministic train/validation partition of the 1797 digits."""
    perm = np.random.default_rng(0).permutation(DEMO_NUM_TRAIN + DEMO_NUM_VALIDATION)
    return {
        "train": np.sort(perm[:DEMO_NUM_TRAIN]),
        "validation": np.sort(perm[DEMO_NUM_TRAIN:]),
    }


class HalluvitDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn digits upscaled to 32x32 RGB (embedded; needs no download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}  # noqa: RUF012 (TFDS convention)

    def _info(self):
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE, 3), encoding_format="png"
                    ),
                    "label": tfds.features.ClassLabel(num_classes=10),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        idx = split_indices()
        return {split: self._generate_examples(ind) for split, ind in idx.items()}

    def _generate_examples(self, indices):
        images, targets = digits()
        for i in indices:
            yield int(i), {
                # Encoded here (cv2) so that the TFDS Image feature only stores bytes: encoding
                # NumPy arrays inside TFDS would need TensorFlow.
                "image": transforms.encode_png(upscale_digit(images[i])),
                "label": int(targets[i]),
                "file_name": f"digit_{int(i):04d}.png",
            }


def prepare_demo(data_dir: str | os.PathLike) -> None:
    """Prepares the demo dataset into ``data_dir`` (a no-op when already prepared; ~seconds)."""
    tfds_utils.prepare_builder(HalluvitDigits(data_dir=os.fspath(data_dir)))


def prepare_if_missing(input_cfg: Any) -> None:
    """Prepares the embedded digits dataset (process 0; the others wait) if it is missing.

    ``input.data_dir`` None means TFDS's default directory (``$TFDS_DATA_DIR`` or
    ``~/tensorflow_datasets``).
    """
    if input_cfg.dataset != DEMO_DATASET:
        return
    if jax.process_index() == 0:
        data_dir = input_cfg.get("data_dir") or None
        builder = HalluvitDigits(data_dir=data_dir)
        if not builder.is_prepared():
            # TFDS prints "Downloading and preparing dataset Unknown size ..." and "downloaded":
            # nothing is downloaded, so say what happens instead.
            logger.info("Preparing the embedded demo dataset into %s (a few seconds, no download).",
                        builder.data_dir_root)
            builder._log_download_bytes = lambda: None
            builder._log_download_done = lambda: None
            tfds_utils.prepare_builder(builder)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("prepare_demo")
