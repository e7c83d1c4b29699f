"""TensorFlow-free TFDS plumbing shared by every dataset of the project.

Everything that *writes* a dataset goes through :func:`prepare_builder` (the demo digits,
ImageNet, CIFAR-100 and Stanford Dogs use the very same function), and everything that *reads*
one goes through :mod:`halluvit_jax.data.registry` (``get_builder`` / ``data_source``), whose
:func:`check_prepared` turns a missing preparation into one clear
:class:`DatasetNotPreparedError` line naming the command that fixes it.

TFDS is used without TensorFlow: builders only use the `tfds.features` encoders (pure
Python/NumPy), the ArrayRecord writer and `as_data_source` for reading.
"""

from __future__ import annotations

import logging
import os
import shutil

import tensorflow_datasets as tfds

logger = logging.getLogger("halluvit_jax.data")

#: File format every dataset is written in (random access; read by grain).
FILE_FORMAT = "array_record"


class DatasetNotPreparedError(FileNotFoundError):
    """Raised when a dataset/split was not prepared in ``data_dir`` (one-line message)."""


class ManualDirError(ValueError):
    """Raised when a manual download directory is missing or malformed."""


def split_name(name: str) -> tuple[str, str | None]:
    """'imagenet_v2/matched-frequency' -> ('imagenet_v2', 'matched-frequency')."""
    base, _, config = name.partition("/")
    base = base.split(":")[0]
    return base, (config or None)


def prepare_command(name: str, data_dir: str | os.PathLike | None) -> str:
    """The shell command that prepares ``name`` into ``data_dir``."""
    base, _ = split_name(name)
    dd = f" --data_dir {data_dir}" if data_dir else " --data_dir DATA_DIR"
    if base == "halluvit_digits":
        return f"python -m halluvit_jax.data.prepare demo{dd}"
    return f"python -m halluvit_jax.data.prepare {name} --manual_dir MANUAL_DIR{dd}"


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
    parent = os.path.dirname(os.fspath(builder.data_dir))
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        if entry.startswith("incomplete."):
            path = os.path.join(parent, entry)
            logger.warning("Removing leftover of an interrupted preparation: %s", path)
            shutil.rmtree(path, ignore_errors=True)
