"""TensorFlow-free TFDS builders for ImageNet-1k (ILSVRC2012), ImageNet-ReaL and ImageNet-v2.

TFDS's stock ``imagenet2012`` builder needs TensorFlow to *prepare* the data: it opens the tars
through ``tf.io.gfile`` and re-encodes the 22 CMYK and 1 PNG train images with TF ops. The
subclass here keeps the stock dataset definition (name ``imagenet2012``, version 5.1.0, same
features, same keys, same label files) and replaces only the generation:

* tars are streamed with plain Python file objects (``tarfile`` in stream mode);
* every image is checked with PIL (header, then a reduced-size "draft" decode that catches
  truncated/corrupt data): CMYK, grayscale-with-alpha and PNG-disguised-as-JPEG images are
  re-encoded as RGB JPEG (quality 100, like the stock builder), detected by *content* (the stock
  builder uses a hard-coded file-name list, which this covers); corrupt images are **skipped**
  with a warning and counted (``Imagenet2012.skipped``) -- never written with a wrong label;
* validation labels are taken from TFDS's shipped ``validation_labels.txt`` by the image
  *number* in ``ILSVRC2012_val_<number>.JPEG`` (row ``number - 1``), so any subset of the
  validation files gets correct labels (the stock builder pairs the *sorted* tar names with the
  rows, which is only right for the full set or a prefix). For the full set both agree;
* train and validation tars are each optional (at least one is required); the output is
  ArrayRecord, readable by ``tfds.data_source('imagenet2012')`` or by our pipeline.

The verification work runs in a small thread pool (PIL releases the GIL while decoding).
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator

import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as _stock
from tensorflow_datasets.datasets.imagenet2012 import imagenet_common
from tqdm.auto import tqdm

from halluvit_jax.data.tfds_utils import ManualDirError

logger = logging.getLogger("halluvit_jax.data")

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
_SYNSET_TAR_RE = re.compile(r"^(n\d{8})\.tar$")
_TRAIN_IMG_RE = re.compile(r"^(n\d{8})_\d+\.JPEG$")
_VAL_IMG_RE = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$")


# --------------------------------------------------------------------------------------------
# Image checking / fixing (PIL only).
# --------------------------------------------------------------------------------------------


class CorruptImageError(ValueError):
    pass


def check_and_fix_image(data: bytes) -> tuple[bytes, str]:
    """Verifies an encoded image and returns ``(jpeg_bytes, action)``.

    ``action`` is ``'ok'`` (unchanged), ``'cmyk'``/``'png'``/``'mode:<M>'`` (re-encoded as RGB
    JPEG, quality 100). Raises :class:`CorruptImageError` for data that cannot be fully decoded.
    """
    try:
        im = Image.open(io.BytesIO(data))
        fmt, mode = im.format, im.mode
        if fmt == "JPEG" and mode in ("RGB", "L"):
            # Reduced-size DCT decode: cheap, but reads every scan -> detects truncation.
            im.draft(mode, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
            return data, "ok"
        im.load()
        action = "cmyk" if mode == "CMYK" else ("png" if fmt == "PNG" else f"mode:{fmt}:{mode}")
        rgb = im.convert("RGB")
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=100)
        return buf.getvalue(), action
    except Exception as e:  # PIL raises OSError / SyntaxError / ValueError for bad data.
        raise CorruptImageError(f"{type(e).__name__}: {e}") from e


def _iter_tar(fileobj) -> Iterator[tuple[str, bytes]]:
    """Streams ``(basename, bytes)`` of the regular files of a tar (no seeking, no TF)."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            f = tar.extractfile(member)
            if f is None:
                continue
            yield os.path.basename(member.name), f.read()


def _first_member_name(path: str) -> str | None:
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if member.isfile():
                return os.path.basename(member.name)
    return None


def validate_manual_dir(manual_dir: str | os.PathLike | None) -> dict[str, str]:
    """Checks an ILSVRC2012 manual dir; returns ``{'train': path, 'validation': path}`` present.

    Raises :class:`ManualDirError` with a clear message when the directory is missing, holds
    neither tar, or a tar is not an ILSVRC2012 tar.
    """
    layout = (f"expected {TRAIN_TAR} (one nXXXXXXXX.tar per synset) and/or {VAL_TAR} "
              "(ILSVRC2012_val_XXXXXXXX.JPEG files) from https://image-net.org/download-images")
    if manual_dir is None or not os.path.isdir(manual_dir):
        raise ManualDirError(f"ImageNet manual_dir {manual_dir!r} does not exist: {layout}")
    manual_dir = os.fspath(manual_dir)
    found = {}
    for split, fname, pattern in (("train", TRAIN_TAR, _SYNSET_TAR_RE),
                                  ("validation", VAL_TAR, _VAL_IMG_RE)):
        path = os.path.join(manual_dir, fname)
        if not os.path.exists(path):
            logger.warning("ImageNet %s split not found (%s); it will be missing.", split, path)
            continue
        try:
            first = _first_member_name(path)
        except (tarfile.TarError, OSError) as e:
            raise ManualDirError(f"{path} is not a readable tar archive ({e}): {layout}") from e
        if first is None or not pattern.match(first):
            raise ManualDirError(f"{path} does not look like {fname}: first file is {first!r}; "
                                 f"{layout}")
        found[split] = path
    if not found:
        raise ManualDirError(f"No ImageNet tar found in manual_dir {manual_dir}: {layout}")
    return found


def read_label_file(path: str | os.PathLike) -> list[str]:
    with open(path) as f:
        return f.read().split()


# --------------------------------------------------------------------------------------------
# Builders.
# --------------------------------------------------------------------------------------------


class VerifyMixin:
    """Shared check/fix/skip loop with counters."""

    #: Threads used to verify images during preparation.
    NUM_VERIFY_THREADS = min(8, os.cpu_count() or 1)

    def _init_counters(self):
        self.skipped: list[str] = []
        self.fixed: collections.Counter = collections.Counter()

    def _checked(self, items: list[tuple[str, bytes]]) -> Iterator[tuple[str, bytes]]:
        """Yields ``(name, fixed_bytes)`` in order, skipping (and counting) corrupt images."""
        if not hasattr(self, "skipped"):
            self._init_counters()

        def work(item):
            name, data = item
            try:
                return name, *check_and_fix_image(data), None
            except CorruptImageError as e:
                return name, None, None, e

        if self.NUM_VERIFY_THREADS > 1 and len(items) > 1:
            with concurrent.futures.ThreadPoolExecutor(self.NUM_VERIFY_THREADS) as ex:
                results = list(ex.map(work, items))
        else:
            results = [work(it) for it in items]
        for name, data, action, err in results:
            if err is not None:
                self.skipped.append(name)
                logger.warning("Skipping corrupt image %s (%s) [%d skipped so far]",
                               name, err, len(self.skipped))
                continue
            if action != "ok":
                self.fixed[action] += 1
                logger.info("Re-encoded %s as RGB JPEG (%s)", name, action)
            yield name, data


class Imagenet2012(VerifyMixin, _stock.Builder, skip_registration=True):
    """ImageNet-1k (ILSVRC2012) prepared without TensorFlow; same dataset as TFDS's."""

    name = "imagenet2012"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _stock.Builder.MANUAL_DOWNLOAD_INSTRUCTIONS

    #: Optional override of the validation labels (one synset per line, row i = val image i+1).
    validation_labels_file: str | None = None

    def _split_generators(self, dl_manager):
        self._init_counters()
        paths = validate_manual_dir(dl_manager.manual_dir)
        synsets = set(read_label_file(imagenet_common.label_names_file()))
        splits = {}
        if "train" in paths:
            splits["train"] = self._generate_train(paths["train"], synsets)
        if "validation" in paths:
            labels_file = self.validation_labels_file or os.fspath(
                tfds.core.tfds_path(imagenet_common._VALIDATION_LABELS_FNAME))
            splits["validation"] = self._generate_validation(
                paths["validation"], read_label_file(labels_file))
        return splits

    def _generate_train(self, path: str, synsets: set[str]):
        with open(path, "rb") as f:
            for inner_name, inner_bytes in tqdm(_iter_tar(f), desc="train synsets", unit="synset",
                                                 total=len(synsets), leave=False):
                m = _SYNSET_TAR_RE.match(inner_name)
                if not m or m.group(1) not in synsets:
                    raise ManualDirError(f"{path}: unexpected member {inner_name!r} "
                                         "(expected nXXXXXXXX.tar of an ImageNet-1k synset)")
                synset = m.group(1)
                items = []
                for fname, data in _iter_tar(io.BytesIO(inner_bytes)):
                    fm = _TRAIN_IMG_RE.match(fname)
                    if not fm or fm.group(1) != synset:
                        raise ManualDirError(f"{path}/{inner_name}: unexpected file {fname!r}")
                    items.append((fname, data))
                for fname, data in self._checked(items):
                    yield fname, {"file_name": fname, "image": data, "label": synset}

    def _generate_validation(self, path: str, labels: list[str]):
        batch: list[tuple[str, bytes]] = []

        def flush():
            for fname, data in self._checked(batch):
                num = int(_VAL_IMG_RE.match(fname).group(1))
                yield fname, {"file_name": fname, "image": data, "label": labels[num - 1]}
            batch.clear()

        with open(path, "rb") as f:
            for fname, data in _iter_tar(f):
                m = _VAL_IMG_RE.match(fname)
                if not m or not 1 <= int(m.group(1)) <= len(labels):
                    raise ManualDirError(f"{path}: unexpected file {fname!r}")
                batch.append((fname, data))
                if len(batch) >= 256:
                    yield from flush()
        yield from flush()

    def _generate_examples(self, *args, **kwargs):  # pragma: no cover - generators used above
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# ImageNet-ReaL and ImageNet-v2 (their stock builders download files with TF I/O; ours read
# the same files from the manual dir).
# --------------------------------------------------------------------------------------------

from tensorflow_datasets.datasets.imagenet2012_real import (  # noqa: E402
    imagenet2012_real_dataset_builder as _stock_real,
)
from tensorflow_datasets.datasets.imagenet_v2 import (  # noqa: E402
    imagenet_v2_dataset_builder as _stock_v2,
)

REAL_JSON = "real.json"


class Imagenet2012Real(VerifyMixin, _stock_real.Builder, skip_registration=True):
    """ImageNet validation images with ReaL labels, prepared without TensorFlow.

    manual_dir must hold ``ILSVRC2012_img_val.tar`` and ``real.json`` (from
    https://github.com/google-research/reassessed-imagenet, the file the stock builder
    downloads). ReaL labels are assigned by validation image number (row ``number - 1``).
    """

    name = "imagenet2012_real"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"manual_dir must contain {VAL_TAR} and {REAL_JSON}."

    def _split_generators(self, dl_manager):
        self._init_counters()
        manual_dir = dl_manager.manual_dir
        paths = validate_manual_dir(manual_dir)
        real_path = os.path.join(manual_dir, REAL_JSON)
        if "validation" not in paths or not os.path.exists(real_path):
            raise ManualDirError(f"imagenet2012_real needs {VAL_TAR} and {REAL_JSON} "
                                 f"(https://github.com/google-research/reassessed-imagenet) in "
                                 f"{manual_dir}")
        with open(real_path) as f:
            real = json.load(f)
        labels = read_label_file(tfds.core.tfds_path(imagenet_common._VALIDATION_LABELS_FNAME))
        return {"validation": self._generate_real(paths["validation"], labels, real)}

    def _generate_real(self, path, labels, real):
        with open(path, "rb") as f:
            items = []
            for fname, data in _iter_tar(f):
                m = _VAL_IMG_RE.match(fname)
                if not m:
                    raise ManualDirError(f"{path}: unexpected file {fname!r}")
                items.append((fname, data))
                if len(items) >= 256:
                    yield from self._real_records(items, labels, real)
                    items = []
            yield from self._real_records(items, labels, real)

    def _real_records(self, items, labels, real):
        for fname, data in self._checked(items):
            num = int(_VAL_IMG_RE.match(fname).group(1))
            yield fname, {"file_name": fname, "image": data, "original_label": labels[num - 1],
                          "real_label": list(real[num - 1])}

    def _generate_examples(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError


class ImagenetV2(VerifyMixin, _stock_v2.Builder, skip_registration=True):
    """ImageNet-v2 (configs matched-frequency / threshold-0.7 / topimages) without TF.

    manual_dir must hold the archive the stock builder downloads, e.g.
    ``imagenetv2-matched-frequency.tar.gz`` from https://huggingface.co/datasets/vaishaal/ImageNetV2
    (layout ``<topdir>/<class_id>/<name>.jpeg``, class ids 0..999 in ImageNet-1k label order).
    """

    name = "imagenet_v2"
    MANUAL_DOWNLOAD_INSTRUCTIONS = "manual_dir must contain imagenetv2-<variant>.tar.gz."

    def _split_generators(self, dl_manager):
        self._init_counters()
        manual_dir = dl_manager.manual_dir
        variant = self.builder_config.variant
        fname = os.path.basename(_stock_v2._IMAGENET_V2_URLS[variant])
        path = os.path.join(os.fspath(manual_dir), fname) if manual_dir else fname
        if not manual_dir or not os.path.exists(path):
            raise ManualDirError(f"imagenet_v2/{variant} needs {fname} "
                                 f"({_stock_v2._IMAGENET_V2_URLS[variant]}) in {manual_dir}")
        return {"test": self._generate_v2(path)}

    def _generate_v2(self, path):
        items, meta = [], {}

        def flush():
            for key, data in self._checked(items):
                class_id, fname = meta[key]
                yield key, {"image": data, "label": class_id,
                            "file_name": f"{class_id}/{fname}"}
            items.clear()

        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = member.name.strip("/").split("/")
                if len(parts) < 2 or not parts[-2].isdigit():
                    continue
                class_id, fname = int(parts[-2]), parts[-1]
                if not 0 <= class_id < 1000:
                    raise ManualDirError(f"{path}: bad class directory in {member.name!r}")
                key = f"{class_id}_{fname}"
                meta[key] = (class_id, fname)
                items.append((key, tar.extractfile(member).read()))
                if len(items) >= 256:
                    yield from flush()
        yield from flush()

    def _generate_examples(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError
