"""The datasets this package prepares without TensorFlow, and the one place that reads any dataset.

A small module of its own so that no import cycle runs through ``data/``: the builder modules
import :mod:`halluvit_jax.data.tfds_utils` (shared plumbing), this module imports the builder
modules, and the pipeline and the ``prepare`` CLI import this module.
"""

from __future__ import annotations

import os
from typing import Any

import tensorflow_datasets as tfds

from halluvit_jax.data import cifar, demo, imagenet, stanford_dogs, tfds_utils

#: Datasets with a TF-free builder in this package (TFDS name -> builder class). Other names
#: fall back to the stock ``tfds.builder`` (fine for reading data prepared elsewhere).
BUILDERS: dict[str, type] = {
    "imagenet2012": imagenet.Imagenet2012,
    "imagenet2012_real": imagenet.Imagenet2012Real,
    "imagenet_v2": imagenet.ImagenetV2,
    "cifar100": cifar.Cifar100,
    "stanford_dogs": stanford_dogs.StanfordDogs,
    demo.DEMO_DATASET: demo.HalluvitDigits,
}


def get_builder(name: str, data_dir: str | os.PathLike | None = None, **kwargs: Any):
    """The (TF-free) builder for ``name`` ('imagenet2012', 'cifar100', 'halluvit_digits', ...)."""
    base, config = tfds_utils.split_name(name)
    data_dir = os.fspath(data_dir) if data_dir is not None else None
    if base in BUILDERS:
        if config is not None:
            kwargs["config"] = config
        return BUILDERS[base](data_dir=data_dir, **kwargs)
    return tfds.builder(name, data_dir=data_dir, **kwargs)


def data_source(name: str, split: str, data_dir: str | os.PathLike | None = None):
    """Random-access source of ``{'image': encoded bytes, 'label': int, ...}`` records.

    Images are *not* decoded (``SkipDecoding``): the input pipeline decodes them itself with
    OpenCV, at reduced size where the crop allows. A dataset or split that is not prepared
    raises :class:`~halluvit_jax.data.tfds_utils.DatasetNotPreparedError` (one line).
    """
    builder = get_builder(name, data_dir)
    tfds_utils.check_prepared(builder, split, name)
    decoders = {"image": tfds.decode.SkipDecoding()} if "image" in builder.info.features else None
    return builder.as_data_source(split=split, decoders=decoders)


__all__ = ["BUILDERS", "data_source", "get_builder"]
