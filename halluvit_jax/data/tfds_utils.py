"""TensorFlow-free TFDS plumbing shared by every dataset of the project.

Everything that *writes* a dataset goes through :func:`prepare_builder` (the demo digits and
ImageNet use the very same function), and everything that *reads* one goes through
:func:`get_builder` / :func:`data_source`, which turn a missing preparation into one clear
:class:`DatasetNotPreparedError` line naming the command that fixes it.

TFDS is used without TensorFlow: builders only use the `tfds.features` encoders (pure
Python/NumPy), the ArrayRecord writer and `as_data_source` for reading.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import tensorflow_datasets as tfds

logger = logging.getLogger("halluvit_jax.data")

#: File format every dataset is written in (random access; read by grain).
FILE_FORMAT = "array_record"


class DatasetNotPreparedError(FileNotFoundError):
    """Raised when a dataset/split was not prepared in ``data_dir`` (one-line message)."""


class ManualDirError(ValueError):
    """Raised when a manual download directory is missing or malformed."""


def _imagenet2012_cls():
    from halluvit_jax.data import imagenet

    return imagenet.Imagenet2012


def _imagenet2012_real_cls():
    from halluvit_jax.data import imagenet

    return imagenet.Imagenet2012Real


def _imagenet_v2_cls():
    from halluvit_jax.data import imagenet

    return imagenet.ImagenetV2


def _demo_cls():
    from halluvit_jax.data import demo

    return demo.HalluvitDigits


#: Datasets with a TF-free builder in this package (name -> lazy class getter). Other names fall
#: back to the stock ``tfds.builder`` (fine for reading data prepared elsewhere).
BUILDERS: dict[str, Callable[[], type]] = {
    "imagenet2012": _imagenet2012_cls,
    "imagenet2012_real": _imagenet2012_real_cls,
    "imagenet_v2": _imagenet_v2_cls,
    "halluvit_digits": _demo_cls,
}


def _split_name(name: str) -> tuple[str, str | None]:
    """'imagenet_v2/matched-frequency' -> ('imagenet_v2', 'matched-frequency')."""
    base, _, config = name.partition("/")
    base = base.split(":")[0]
    return base, (config or None)


def prepare_command(name: str, data_dir: str | os.PathLike | None) -> str:
    """The shell command that prepares ``name`` into ``data_dir``."""
    base, _ = _split_name(name)
    dd = f" --data_dir {data_dir}" if data_dir else " --data_dir DATA_DIR"
    if base == "halluvit_digits":
        return f"python -m halluvit_jax.data.prepare demo{dd}"
    return f"python -m halluvit_jax.data.prepare {name} --manual_dir MANUAL_DIR{dd}"


def get_builder(name: str, data_dir: str | os.PathLike | None = None, **kwargs: Any):
    """Returns the (TF-free) builder for ``name`` ('imagenet2012', 'halluvit_digits', ...)."""
    base, config = _split_name(name)
    data_dir = os.fspath(data_dir) if data_dir is not None else None
    if base in BUILDERS:
        cls = BUILDERS[base]()
        if config is not None:
            kwargs["config"] = config
        return cls(data_dir=data_dir, **kwargs)
    return tfds.builder(name, data_dir=data_dir, **kwargs)


def check_prepared(builder, split: str | None = None, name: str | None = None) -> None:
    """Raises :class:`DatasetNotPreparedError` if ``builder`` (or ``split``) is not prepared."""
    name = name or builder.name
    if not builder.is_prepared():
        raise DatasetNotPreparedError(
            f"Dataset '{name}' is not prepared in {builder.data_dir_root}; run: "
            f"{prepare_command(name, builder.data_dir_root)}"
        )
    if split is not None:
        base_split = str(split).split("[")[0]
        if base_split not in builder.info.splits:
            raise DatasetNotPreparedError(
                f"Split '{base_split}' of '{name}' is not prepared in {builder.data_dir_root} "
                f"(have: {sorted(builder.info.splits)}); run: "
                f"{prepare_command(name, builder.data_dir_root)}"
            )


def data_source(name: str, split: str, data_dir: str | os.PathLike | None = None):
    """Random-access source of ``{'image': encoded bytes, 'label': int, ...}`` records.

    Images are *not* decoded (``SkipDecoding``): the input pipeline decodes them itself with
    OpenCV, at reduced size where the crop allows.
    """
    builder = get_builder(name, data_dir)
    check_prepared(builder, split, name)
    decoders = {"image": tfds.decode.SkipDecoding()} if "image" in builder.info.features else None
    return builder.as_data_source(split=split, decoders=decoders)


def prepare_builder(builder, *, manual_dir: str | os.PathLike | None = None) -> bool:
    """Prepares ``builder`` as ArrayRecord without TensorFlow and without network.

    Idempotent: a finished dataset is detected (``dataset_info.json`` in the final versioned
    directory) and nothing is redone. TFDS writes into an ``incomplete.*`` temporary directory
    and renames it only on success, so an interrupted run never leaves a dataset that looks
    complete; leftovers of interrupted runs are removed before a new attempt.

    Returns:
      True if data was generated, False if the dataset was already prepared.
    """
    if builder.is_prepared():
        logger.info("%s already prepared in %s; nothing to do.", builder.name, builder.data_dir)
        return False
    _remove_incomplete_dirs(builder)
    config = tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir) if manual_dir is not None else None,
        try_download_gcs=False,
        compute_stats=tfds.download.ComputeStatsMode.SKIP,
    )
    tfds.display_progress_bar(True)
    builder.download_and_prepare(download_config=config, file_format=FILE_FORMAT)
    return True


def _remove_incomplete_dirs(builder) -> None:
    import shutil

    parent = os.path.dirname(os.fspath(builder.data_dir))
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        if entry.startswith("incomplete."):
            path = os.path.join(parent, entry)
            logger.warning("Removing leftover of an interrupted preparation: %s", path)
            shutil.rmtree(path, ignore_errors=True)
