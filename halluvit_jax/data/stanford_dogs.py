"""TensorFlow-free TFDS builder for Stanford Dogs from its standard archives.

TFDS's stock ``stanford_dogs`` builder downloads ``images.tar``, ``lists.tar`` and
``annotation.tar`` and reads them through ``tf.io.gfile``. The subclass here keeps the stock
dataset definition (name ``stanford_dogs``, version 0.2.0, features ``image`` (JPEG),
``image/filename``, ``label`` (120 classes named by the lower-cased ``<wnid>-<breed>``
directories, sorted), ``objects/bbox``; splits ``train``/``test`` from ``train_list.mat`` /
``test_list.mat``; keys are the archive paths) and replaces only the generation. The user
places the archives from http://vision.stanford.edu/aditya86/ImageNetDogs/ in ``--manual_dir``:

* ``images.tar`` (``Images/<wnid>-<breed>/<file>.jpg``) and ``lists.tar`` (MATLAB v5
  ``train_list.mat`` / ``test_list.mat`` with ``file_list``), both required;
* ``annotation.tar`` (``Annotation/<wnid>-<breed>/<file>`` XML) is optional: with it the
  ``objects/bbox`` feature holds the boxes as in the stock builder, without it it is empty.

``images.tar`` is streamed once per split with plain file objects. Every image is checked with
PIL as for ImageNet (:func:`halluvit_jax.data.imagenet.check_and_fix_image`): non-RGB or
non-JPEG images are re-encoded, **corrupt images are skipped** with a warning carrying the
running count and listed in ``StanfordDogs.skipped``; listed images absent from the tar are
counted in ``StanfordDogs.missing``. Missing or malformed archives raise
:class:`~halluvit_jax.data.tfds_utils.ManualDirError` with one line naming the expected file.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tarfile
import xml.etree.ElementTree as ET
import zlib

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.stanford_dogs import stanford_dogs_dataset_builder as _stock

from halluvit_jax.data.imagenet import VerifyMixin
from halluvit_jax.data.tfds_utils import ManualDirError

logger = logging.getLogger("halluvit_jax.data")

HOMEPAGE = "http://vision.stanford.edu/aditya86/ImageNetDogs/"
IMAGES_TAR = "images.tar"
LISTS_TAR = "lists.tar"
ANNOTATION_TAR = "annotation.tar"
_SPLIT_LISTS = {"train": "train_list.mat", "test": "test_list.mat"}
#: ``Images/<wnid>-<breed>/<file>.jpg`` -> ('<wnid>-<breed>/<file>.jpg')
_IMAGE_RE = re.compile(r"^(?:.*/)?Images/([^/]+/[^/]+\.jpg)$", re.IGNORECASE)
_BATCH = 256


def _layout() -> str:
    return (f"expected {IMAGES_TAR} (Images/<wnid>-<breed>/<file>.jpg) and {LISTS_TAR} "
            f"(train_list.mat, test_list.mat), optionally {ANNOTATION_TAR}, from {HOMEPAGE}")


def _tar_members(path: str, keep) -> dict[str, bytes]:
    """``{member name: bytes}`` of the regular files whose name ``keep`` accepts."""
    out = {}
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if member.isfile() and keep(member.name):
                    out[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ManualDirError(f"{path} is not a readable tar archive "
                             f"({type(e).__name__}: {e}): {_layout()}") from e
    return out


def _first_file(path: str) -> str | None:
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if member.isfile():
                    return member.name
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ManualDirError(f"{path} is not a readable tar archive "
                             f"({type(e).__name__}: {e}): {_layout()}") from e
    return None


def validate_manual_dir(manual_dir) -> dict[str, str]:
    """``{'images': path, 'lists': path[, 'annotation': path]}``; ManualDirError when malformed."""
    if manual_dir is None or not os.path.isdir(manual_dir):
        raise ManualDirError(f"Stanford Dogs manual_dir {manual_dir!r} does not exist: {_layout()}")
    manual_dir = os.fspath(manual_dir)
    paths = {}
    for key, fname in (("images", IMAGES_TAR), ("lists", LISTS_TAR)):
        path = os.path.join(manual_dir, fname)
        if not os.path.isfile(path):
            raise ManualDirError(f"{path} not found: {_layout()}")
        paths[key] = path
    first = _first_file(paths["images"])
    if first is None or not _IMAGE_RE.match(first):
        raise ManualDirError(f"{paths['images']} does not look like {IMAGES_TAR}: first file is "
                             f"{first!r}; {_layout()}")
    annotation = os.path.join(manual_dir, ANNOTATION_TAR)
    if os.path.isfile(annotation):
        paths["annotation"] = annotation
    else:
        logger.warning("%s not found: objects/bbox will be empty.", annotation)
    return paths


def read_lists(path: str) -> dict[str, list[str]]:
    """``{'train': ['<wnid>-<breed>/<file>.jpg', ...], 'test': [...]}`` from ``lists.tar``."""
    from scipy import io as sio

    wanted = set(_SPLIT_LISTS.values())
    members = _tar_members(path, lambda n: os.path.basename(n) in wanted)
    found = {os.path.basename(n): data for n, data in members.items()}
    for fname in _SPLIT_LISTS.values():
        if fname not in found:
            raise ManualDirError(f"{path} lacks {fname}: {_layout()}")
    out = {}
    for split, fname in _SPLIT_LISTS.items():
        try:
            mat = sio.loadmat(io.BytesIO(found[fname]), squeeze_me=True)
            files = ([str(x) for x in np.atleast_1d(mat["file_list"]).ravel()]
                     if "file_list" in mat else None)
        except Exception as e:  # scipy raises ValueError/TypeError/... for damaged .mat files
            raise ManualDirError(f"{path}: {fname} is not a readable MATLAB file "
                                 f"({type(e).__name__}: {e}): {_layout()}") from e
        if not files:
            raise ManualDirError(f"{path}: {fname} has no file_list: {_layout()}")
        bad = [f for f in files if f.count("/") != 1]
        if bad:
            raise ManualDirError(f"{path}: {fname} entry {bad[0]!r} is not <wnid>-<breed>/<file>")
        out[split] = files
    return out


def read_annotations(path: str) -> dict[str, list[dict]]:
    """``{'<wnid>-<breed>/<file>': [bbox attrs, ...]}`` from ``annotation.tar`` (stock parsing)."""
    members = _tar_members(path, lambda n: "/Annotation/" in "/" + n)
    out = {}
    for name, data in members.items():
        key = "/".join(name.split("/")[-2:])
        try:
            root = ET.fromstring(data)
        except ET.ParseError as e:
            logger.warning("Skipping unreadable annotation %s (%s)", name, e)
            continue
        attrs: dict[str, list[float]] = {}
        for element in root.iter():
            tag = element.tag.strip()
            if tag in ("xmin", "xmax", "ymin", "ymax", "width", "height"):
                attrs.setdefault(tag, []).append(float(element.text.strip()))
        out[key] = attrs
    return out


def _boxes(attrs: dict[str, list[float]] | None) -> list[dict]:
    if not attrs or not attrs.get("width") or not attrs.get("height"):
        return []
    w, h = attrs["width"][0], attrs["height"][0]
    return [{"bbox": tfds.features.BBox(ymin=min(attrs["ymin"][n] / h, 1.0),
                                        xmin=min(attrs["xmin"][n] / w, 1.0),
                                        ymax=min(attrs["ymax"][n] / h, 1.0),
                                        xmax=min(attrs["xmax"][n] / w, 1.0))}
            for n in range(len(attrs.get("xmin", [])))]


class StanfordDogs(VerifyMixin, _stock.Builder, skip_registration=True):
    """Stanford Dogs prepared without TensorFlow from images.tar + lists.tar; same dataset as TFDS's."""

    name = "stanford_dogs"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (f"Place {IMAGES_TAR} and {LISTS_TAR} (and optionally "
                                    f"{ANNOTATION_TAR}) from {HOMEPAGE} in manual_dir.")

    def _split_generators(self, dl_manager):
        self._init_counters()
        self.missing: list[str] = []
        paths = validate_manual_dir(dl_manager.manual_dir)
        lists = read_lists(paths["lists"])
        names = sorted({f.split("/")[0].lower() for f in lists["train"]})
        if len(names) != 120:
            raise ManualDirError(f"{paths['lists']}: train_list.mat names {len(names)} breeds, "
                                 "expected 120")
        for f in lists["test"]:
            if f.split("/")[0].lower() not in names:
                raise ManualDirError(f"{paths['lists']}: test_list.mat breed of {f!r} is not in "
                                     "train_list.mat")
        self.info.features["label"].names = names
        boxes = read_annotations(paths["annotation"]) if "annotation" in paths else {}
        return {split: self._generate(paths["images"], files, boxes)
                for split, files in lists.items()}

    def _generate(self, path: str, files: list[str], boxes: dict):
        wanted = set(files)
        seen: set[str] = set()
        batch: list[tuple[str, bytes]] = []

        def flush():
            for member, data in self._checked(batch):
                rel = _IMAGE_RE.match(member).group(1)
                yield member, {"image": data, "image/filename": member,
                               "label": rel.split("/")[0].lower(),
                               "objects": _boxes(boxes.get(rel[: -len(".jpg")]))}
            batch.clear()

        written = 0
        try:
            with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    m = _IMAGE_RE.match(member.name) if member.isfile() else None
                    if not m or m.group(1) not in wanted or m.group(1) in seen:
                        continue
                    seen.add(m.group(1))
                    batch.append((member.name, tar.extractfile(member).read()))
                    if len(batch) >= _BATCH:
                        for item in flush():
                            written += 1
                            yield item
                # tarfile ends quietly at a header cut short; a whole archive has its two zero
                # end-of-archive blocks after the last member.
                if os.path.getsize(path) < tar.offset + 2 * tarfile.BLOCKSIZE:
                    raise tarfile.ReadError(f"ends inside the header after byte {tar.offset}")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise ManualDirError(f"{path} is truncated or damaged ({type(e).__name__}: {e}): "
                                 f"{_layout()}") from e
        for item in flush():
            written += 1
            yield item
        if not written:
            raise ManualDirError(f"{path}: none of the {len(files)} listed images was found "
                                 f"(or readable): {_layout()}")
        absent = [f for f in files if f not in seen]
        if absent:
            self.missing.extend(absent)
            logger.warning("%s: %d listed image(s) not in the archive (e.g. %s)", path,
                           len(absent), absent[0])

    def _generate_examples(self, *args, **kwargs):  # pragma: no cover - _generate used above
        raise NotImplementedError


__all__ = ["ANNOTATION_TAR", "IMAGES_TAR", "LISTS_TAR", "StanfordDogs", "read_lists",
           "validate_manual_dir"]
