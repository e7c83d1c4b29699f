"""Generator of a small *fake ImageNet manual dir* in the exact ILSVRC2012 tar layout.

The images are real photographs bundled with scikit-image (``skimage.data``), randomly cropped
and resized to 60-300 px and JPEG-encoded, so the whole prepare -> read -> augment path runs on
real JPEG data. Layout written (identical to the files image-net.org distributes)::

    MANUAL_DIR/ILSVRC2012_img_train.tar      # one inner tar per synset
        n01751748.tar -> n01751748_1.JPEG, n01751748_2.JPEG, ...
        ...
    MANUAL_DIR/ILSVRC2012_img_val.tar        # flat
        ILSVRC2012_val_00000001.JPEG ... ILSVRC2012_val_0000000N.JPEG

Like real ImageNet it contains a CMYK JPEG (named ``n01739381_1309.JPEG``, one of the 22 CMYK
files of ILSVRC2012), a PNG disguised as JPEG (``n02105855_2933.JPEG``, the real one), a
grayscale JPEG, and optionally a corrupt (truncated) JPEG and a tiny image smaller than the crop.

Synsets are real ImageNet synsets taken from TFDS's shipped ``labels.txt``; the validation files
are a prefix ``1..N`` of the official numbering, so their labels are rows ``1..N`` of TFDS's shipped
``validation_labels.txt`` (what :class:`halluvit_jax.data.imagenet.Imagenet2012` assigns).
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile

import numpy as np

#: Train synsets: the labels of val images 1-3 plus the synset of a real CMYK file.
SYNSETS = ("n01751748", "n09193705", "n02105855", "n01739381")
CMYK_NAME = "n01739381_1309.JPEG"  # a real ILSVRC2012 CMYK file name
PNG_NAME = "n02105855_2933.JPEG"  # the real ILSVRC2012 PNG-disguised-as-JPEG file name
GRAY_NAME = "n09193705_77.JPEG"
CORRUPT_NAME = "n01751748_666.JPEG"
SMALL_NAME = "n09193705_5.JPEG"  # 40x30 pixels: smaller than any crop


def _tfds_file(name: str) -> str:
    import tensorflow_datasets as tfds

    return os.fspath(tfds.core.tfds_path(f"datasets/imagenet2012/{name}"))


def imagenet_synsets() -> list[str]:
    with open(_tfds_file("labels.txt")) as f:
        return f.read().split()


def imagenet_validation_labels() -> list[str]:
    with open(_tfds_file("validation_labels.txt")) as f:
        return f.read().split()


def photos() -> list[np.ndarray]:
    """Real RGB photographs (uint8 HxWx3) bundled with scikit-image (no download)."""
    import skimage.data as d

    return [d.astronaut(), d.coffee(), d.chelsea(), d.rocket(), d.immunohistochemistry(),
            d.hubble_deep_field(), d.colorwheel()]


def random_photo(rng: np.random.Generator, min_side: int = 60, max_side: int = 300,
                 pool: list[np.ndarray] | None = None) -> np.ndarray:
    """A random crop of a real photo resized to a random size in [min_side, max_side]."""
    import cv2

    pool = pool if pool is not None else photos()
    src = pool[int(rng.integers(len(pool)))]
    H, W = src.shape[:2]
    ch, cw = int(rng.integers(H // 2, H + 1)), int(rng.integers(W // 2, W + 1))
    y, x = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
    crop = src[y:y + ch, x:x + cw]
    h, w = int(rng.integers(min_side, max_side + 1)), int(rng.integers(min_side, max_side + 1))
    return cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA)


def encode(img: np.ndarray, fmt: str = "JPEG", mode: str | None = None, quality: int = 90) -> bytes:
    """Encodes ``img`` with PIL (``mode='CMYK'`` writes a CMYK JPEG, ``fmt='PNG'`` a PNG)."""
    from PIL import Image

    im = Image.fromarray(img)
    if mode is not None:
        im = im.convert(mode)
    buf = io.BytesIO()
    kwargs = {"quality": quality} if fmt == "JPEG" else {}
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


@dataclasses.dataclass
class FakeImageNet:
    manual_dir: str
    #: file name -> synset, for every *valid* train image (corrupt ones excluded).
    train: dict[str, str]
    #: file name -> synset for the validation images.
    validation: dict[str, str]
    #: file name -> the RGB pixels that were encoded (CMYK/PNG/gray included).
    pixels: dict[str, np.ndarray]
    corrupt: list[str]


def make_fake_imagenet(manual_dir: str | os.PathLike, *, images_per_class: int = 3,
                       num_val: int = 6, corrupt: bool = True, small: bool = True,
                       seed: int = 0, min_side: int = 60, max_side: int = 300,
                       quality: int = 90) -> FakeImageNet:
    """Writes ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` into ``manual_dir``."""
    import cv2

    manual_dir = os.fspath(manual_dir)
    os.makedirs(manual_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = photos()
    all_synsets = set(imagenet_synsets())
    assert all(s in all_synsets for s in SYNSETS)

    train: dict[str, str] = {}
    pixels: dict[str, np.ndarray] = {}
    corrupt_names: list[str] = []
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
        for synset in SYNSETS:
            inner_buf = io.BytesIO()
            with tarfile.open(fileobj=inner_buf, mode="w") as inner:
                names = [f"{synset}_{1000 + 17 * i}.JPEG" for i in range(images_per_class)]
                for special in (CMYK_NAME, PNG_NAME, GRAY_NAME, SMALL_NAME):
                    if special.startswith(synset) and (special != SMALL_NAME or small):
                        names.append(special)
                for name in names:
                    img = random_photo(rng, min_side, max_side, pool=pool)
                    if name == CMYK_NAME:
                        data = encode(img, "JPEG", mode="CMYK", quality=95)
                    elif name == PNG_NAME:
                        data = encode(img, "PNG")
                    elif name == GRAY_NAME:
                        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
                        data = encode(img, "JPEG")
                        img = np.repeat(img[:, :, None], 3, axis=2)
                    elif name == SMALL_NAME:
                        img = cv2.resize(img, (40, 30), interpolation=cv2.INTER_AREA)
                        data = encode(img, "JPEG")
                    else:
                        data = encode(img, "JPEG", quality=quality)
                    _add(inner, name, data)
                    train[name] = synset
                    pixels[name] = img
                if corrupt and synset == CORRUPT_NAME.split("_")[0]:
                    data = encode(random_photo(rng, 150, 200, pool=pool), "JPEG")
                    _add(inner, CORRUPT_NAME, data[: len(data) // 3])  # truncated JPEG
                    corrupt_names.append(CORRUPT_NAME)
            _add(outer, f"{synset}.tar", inner_buf.getvalue())

    val_labels = imagenet_validation_labels()
    validation: dict[str, str] = {}
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as vt:
        # Written in shuffled order: labels must follow the file *number*, not the tar order.
        for i in rng.permutation(num_val) + 1:
            name = f"ILSVRC2012_val_{int(i):08d}.JPEG"
            img = random_photo(rng, min_side, max_side, pool=pool)
            _add(vt, name, encode(img, "JPEG", quality=quality))
            validation[name] = val_labels[int(i) - 1]
            pixels[name] = img
    return FakeImageNet(manual_dir, train, validation, pixels, corrupt_names)


# --------------------------------------------------------------------------------------------
# Cached builders shared by the data test modules (built once per pytest session).
# --------------------------------------------------------------------------------------------

_CACHE: dict = {}


def prepared_fake_imagenet(tmp_path_factory):
    """(FakeImageNet, data_dir, prepare-summary) of a prepared fake ImageNet, built once."""
    if "imagenet" not in _CACHE:
        import logging

        from halluvit_jax.data import prepare

        root = tmp_path_factory.mktemp("fake_imagenet")
        fake = make_fake_imagenet(root / "manual")
        logger = logging.getLogger("halluvit_jax.data")
        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append  # type: ignore[method-assign]
        logger.addHandler(handler)
        try:
            summary = prepare.prepare_dataset("imagenet2012", root / "data", fake.manual_dir)
        finally:
            logger.removeHandler(handler)
        summary["log"] = records
        _CACHE["imagenet"] = (fake, str(root / "data"), summary)
    return _CACHE["imagenet"]


def prepared_demo(tmp_path_factory) -> str:
    """data_dir holding the prepared digits demo, built once."""
    if "demo" not in _CACHE:
        from halluvit_jax.data import demo

        d = tmp_path_factory.mktemp("demo_data")
        demo.prepare_demo(d)
        _CACHE["demo"] = str(d)
    return _CACHE["demo"]


# --------------------------------------------------------------------------------------------
# CIFAR-100 python archive (cifar-100-python.tar.gz) of real images.
# --------------------------------------------------------------------------------------------


def write_cifar100_archive(path: str | os.PathLike, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """``cifar-100-python.tar.gz`` in the layout Toronto ships: ``cifar-100-python/{train,test,meta}``,
    Python-2 pickles (protocol 2, bytes keys) with ``data`` uint8 ``[N, 3072]`` (R, G, B planes of
    32x32), ``fine_labels``, ``coarse_labels`` (fine // 5), and the 100 / 20 label names in ``meta``.
    ``splits``: ``{'train': (images uint8 [N, 32, 32, 3], fine labels [N]), 'test': ...}``."""
    import pickle

    members = {"meta": {b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
                        b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)]}}
    for name, (images, fine) in splits.items():
        fine = np.asarray(fine, np.int64)
        members[name] = {b"data": np.asarray(images, np.uint8).transpose(0, 3, 1, 2).reshape(len(fine), 3072),
                         b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist(),
                         b"batch_label": f"{name} batch 1 of 1".encode(),
                         b"filenames": [f"{name}_{i}.png".encode() for i in range(len(fine))]}
    with tarfile.open(path, "w:gz") as tar:
        for name, d in members.items():
            _add(tar, f"cifar-100-python/{name}", pickle.dumps(d, protocol=2))


#: digit d -> its CIFAR-100 fine class in :func:`digits_as_cifar100` (an arbitrary relabelling).
DIGIT_FINE_LABELS = (5, 14, 23, 32, 41, 50, 59, 68, 77, 86)


def digits_as_cifar100(manual_dir: str | os.PathLike, num_train: int = 200) -> dict[str, np.ndarray]:
    """A CIFAR-100 archive of real images in ``manual_dir``: the embedded demo's *validation*
    digits (32x32 RGB as ``halluvit_digits`` stores them; a model trained on its train split has
    never seen them), digit d labelled fine class ``DIGIT_FINE_LABELS[d]``; the first
    ``num_train`` are the train split, the rest (97 of 297) the test split. Returns the labels."""
    from halluvit_jax.data import demo

    images8, digits = demo.digits()
    idx = demo.split_indices()["validation"]
    images = np.stack([demo.upscale_digit(images8[i]) for i in idx])
    fine = np.asarray(DIGIT_FINE_LABELS)[digits[idx]]
    os.makedirs(manual_dir, exist_ok=True)
    write_cifar100_archive(os.path.join(manual_dir, "cifar-100-python.tar.gz"),
                           {"train": (images[:num_train], fine[:num_train]), "test": (images[num_train:], fine[num_train:])})
    return {"train": fine[:num_train], "test": fine[num_train:]}
