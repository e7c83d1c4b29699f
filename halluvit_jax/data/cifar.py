"""TensorFlow-free TFDS builder for CIFAR-100 from the standard python archive.

TFDS's stock ``cifar100`` builder downloads the *binary* archive and reads it with
``tf.io.gfile``; its image feature encodes NumPy arrays as PNG with TensorFlow. The subclass
here keeps the stock dataset definition (name ``cifar100``, version 3.0.2, features ``id``,
``image`` 32x32x3 PNG, ``label`` 100 classes, ``coarse_label`` 20 classes, splits
``train``/``test``, keys and ids in file order) and replaces only the generation: it reads the
*python* archive ``cifar-100-python.tar.gz`` that the user placed in ``--manual_dir``
(members ``cifar-100-python/{train,test,meta}``: pickled dicts with ``b'data'`` uint8
``[N, 3072]`` (R, G, B planes of 32x32), ``b'fine_labels'``, ``b'coarse_labels'``;
``meta`` holds the label names) and PNG-encodes the images with OpenCV.

The pickles are read with a restricted unpickler that only builds NumPy arrays, lists, dicts
and scalars: a tampered archive cannot run code. A missing, truncated or foreign archive, a
missing member and inconsistent arrays raise :class:`~halluvit_jax.data.tfds_utils.ManualDirError`
with one line naming the expected file and where to get it. There are no per-image files that
could be corrupt: every row of a consistent array is a valid image.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import tarfile
import zlib

import numpy as np
from tensorflow_datasets.image_classification import cifar as _stock

from halluvit_jax.data import transforms
from halluvit_jax.data.tfds_utils import ManualDirError

logger = logging.getLogger("halluvit_jax.data")

ARCHIVE = "cifar-100-python.tar.gz"
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
_MEMBERS = ("train", "test", "meta")
_SIDE = 32


_WANT = f"expected the CIFAR-100 python version, {URL}"


def _layout(manual_dir) -> str:
    return (f"expected {ARCHIVE} (the CIFAR-100 python version, {URL}) in manual_dir "
            f"{os.fspath(manual_dir) if manual_dir is not None else None!r}")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles what CIFAR's pickles hold (NumPy arrays, builtins), refuses anything else."""

    _ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    })

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(data: bytes) -> dict:
    obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    if not isinstance(obj, dict):
        raise pickle.UnpicklingError(f"expected a dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def check_manual_dir(manual_dir) -> str:
    """Path of the archive in ``manual_dir``; :class:`ManualDirError` when it is not there."""
    if manual_dir is None or not os.path.isdir(manual_dir):
        raise ManualDirError(f"CIFAR-100 manual_dir {manual_dir!r} does not exist: "
                             f"{_layout(manual_dir)}")
    path = os.path.join(os.fspath(manual_dir), ARCHIVE)
    if not os.path.isfile(path):
        raise ManualDirError(f"{path} not found: {_layout(manual_dir)}")
    return path


def read_archive(manual_dir) -> dict[str, dict]:
    """``{'train': {...}, 'test': {...}, 'meta': {...}}`` from ``manual_dir/ARCHIVE``.

    Raises :class:`ManualDirError` (one line) for a missing dir/archive, an unreadable or
    truncated archive, a missing member or a member that is not a CIFAR pickle.
    """
    path = check_manual_dir(manual_dir)
    raw: dict[str, bytes] = {}
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                parts = member.name.strip("/").split("/")
                if member.isfile() and parts[-1] in _MEMBERS and len(parts) <= 2:
                    raw[parts[-1]] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ManualDirError(f"{path} is not a readable tar.gz archive "
                             f"({type(e).__name__}: {e}): {_layout(manual_dir)}") from e
    missing = [m for m in _MEMBERS if m not in raw]
    if missing:
        raise ManualDirError(f"{path} lacks cifar-100-python/{{{','.join(missing)}}}: "
                             f"{_layout(manual_dir)}")
    out = {}
    for name, data in raw.items():
        try:
            out[name] = _unpickle(data)
        except Exception as e:  # pickle raises many types for damaged data
            raise ManualDirError(f"{path}: member {name!r} is not a CIFAR-100 pickle "
                                 f"({type(e).__name__}: {e}): {_layout(manual_dir)}") from e
    return out


def check_split(name: str, d: dict, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images uint8 [N, 32, 32, 3], fine [N], coarse [N])`` of one split dict, validated."""
    try:
        data = np.asarray(d["data"])
        fine = np.asarray(d["fine_labels"], np.int64)
        coarse = np.asarray(d["coarse_labels"], np.int64)
    except KeyError as e:
        raise ManualDirError(f"{path}: {name} has no {e.args[0]!r} entry; {_WANT}") from None
    n = len(fine)
    if data.dtype != np.uint8 or data.shape != (n, 3 * _SIDE * _SIDE) or len(coarse) != n:
        raise ManualDirError(f"{path}: {name} data {data.dtype}{list(data.shape)} does not match "
                             f"{n} fine / {len(coarse)} coarse labels (uint8 [N, 3072]); {_WANT}")
    for what, lab, k in (("fine", fine, 100), ("coarse", coarse, 20)):
        if n and not (lab.min() >= 0 and lab.max() < k):
            raise ManualDirError(f"{path}: {name} {what} labels outside [0, {k}); {_WANT}")
    images = data.reshape(n, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1)
    return images, fine, coarse


def _names(meta: dict, key: str, k: int, path: str) -> list[str]:
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(key, [])]
    if len(set(names)) != k or len(names) != k:
        raise ManualDirError(f"{path}: meta {key} has {len(set(names))} distinct names in "
                             f"{len(names)}, expected {k}; {_WANT}")
    return names


class Cifar100(_stock.Cifar100, skip_registration=True):
    """CIFAR-100 prepared without TensorFlow from ``cifar-100-python.tar.gz``; same dataset as TFDS's."""

    name = "cifar100"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Place {ARCHIVE} ({URL}) in manual_dir."

    def _split_generators(self, dl_manager):
        manual_dir = dl_manager.manual_dir
        path = os.path.join(os.fspath(manual_dir), ARCHIVE)
        parts = read_archive(manual_dir)
        self.info.features["label"].names = _names(parts["meta"], "fine_label_names", 100, path)
        self.info.features["coarse_label"].names = _names(
            parts["meta"], "coarse_label_names", 20, path)
        splits = {s: check_split(s, parts[s], path) for s in ("train", "test")}
        return {s: self._generate(s, *arrays) for s, arrays in splits.items()}

    def _generate(self, split, images, fine, coarse):
        for i in range(len(fine)):
            yield i, {"id": f"{split}_{i:05d}", "image": transforms.encode_png(images[i]),
                      "label": int(fine[i]), "coarse_label": int(coarse[i])}

    def _generate_examples(self, *args, **kwargs):  # pragma: no cover - _generate used above
        raise NotImplementedError


__all__ = ["ARCHIVE", "URL", "Cifar100", "check_manual_dir", "read_archive"]
