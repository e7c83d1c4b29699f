"""The images to analyse, preprocessed as the loaded checkpoint's input spec says.

Data (``--data``): ``demo`` (the embedded digits' validation split, built in memory from
scikit-learn; no preparation), a directory of image files (``*.png``, ``*.jpg``, ``*.jpeg``,
sorted by name), or ``tfds:NAME[:SPLIT]`` with ``--data-dir`` (a prepared TFDS dataset, read
with the package's eval pipeline; split default ``validation``).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

import numpy as np

from halluvit_jax.cli import UsageError
from halluvit_jax.data import demo, pipeline, transforms
from halluvit_jax.data.config import default_input_config
from halluvit_jax.loading import Loaded

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def preprocess_file(path: str, loaded: Loaded) -> tuple[np.ndarray, np.ndarray]:
    """(normalized float32 ``[S, S, 3]``, the uint8 crop it came from) of one image file."""
    with open(path, "rb") as f:
        data = f.read()
    img = transforms.decode(data)
    if img is None:
        raise ValueError(f"Cannot decode image {path!r}; pass a PNG or JPEG file.")
    crop = transforms.resize_center_crop(img, loaded.input.image_size, loaded.input.crop_pct)
    crop = np.asarray(crop, np.uint8)
    norm = (crop.astype(np.float32) / 255.0 - np.asarray(loaded.input.mean, np.float32)) / np.asarray(loaded.input.std, np.float32)
    return norm.astype(np.float32), crop


def demo_images(split: str = "validation") -> np.ndarray:
    """The embedded digits of ``split`` as uint8 ``[N, 32, 32, 3]`` (same pixels as the TFDS demo)."""
    idx = demo.split_indices()
    if split not in idx:
        raise ValueError(f"The demo has splits {sorted(idx)}, not {split!r}.")
    images, _ = demo.digits()
    return np.stack([demo.upscale_digit(images[i]) for i in idx[split]])


def iter_batches(data: str, loaded: Loaded, *, batch_size: int = 64, data_dir: str | None = None,
                 max_images: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Normalized ``{'image', 'mask'}`` batches of ``data`` (see the module docstring)."""
    mean = np.asarray(loaded.input.mean, np.float32)
    std = np.asarray(loaded.input.std, np.float32)

    def chunks(arrays: np.ndarray):
        for i in range(0, len(arrays), batch_size):
            x = arrays[i:i + batch_size]
            yield {"image": x, "mask": np.ones(len(x), bool)}

    if data == "demo":
        imgs = demo_images()[:max_images]
        if imgs.shape[1] != loaded.input.image_size:
            imgs = np.stack([transforms.resize(im, loaded.input.image_size) for im in imgs])
        yield from chunks(((imgs.astype(np.float32) / 255.0 - mean) / std).astype(np.float32))
        return
    if data.startswith("tfds:"):
        parts = data.split(":")
        cfg = default_input_config()
        cfg.dataset = parts[1]
        cfg.eval_split = parts[2] if len(parts) > 2 and parts[2] else "validation"
        cfg.data_dir = data_dir
        cfg.image_size = loaded.input.image_size
        cfg.crop_pct = loaded.input.crop_pct
        cfg.mean, cfg.std = tuple(loaded.input.mean), tuple(loaded.input.std)
        seen = 0
        for batch in pipeline.create_eval_iter(cfg, global_batch_size=batch_size):
            yield {"image": batch["image"], "mask": batch["mask"]}
            seen += int(np.sum(batch["mask"]))
            if max_images is not None and seen >= max_images:
                return
        return
    if os.path.isdir(data):
        files = sorted(f for f in glob.glob(os.path.join(data, "*")) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise UsageError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {data!r}; pass a directory of images")
        files = files[:max_images]
        for i in range(0, len(files), batch_size):
            x = np.stack([preprocess_file(f, loaded)[0] for f in files[i:i + batch_size]])
            yield {"image": x, "mask": np.ones(len(x), bool)}
        return
    raise UsageError(f"unknown --data {data!r}; use 'demo', a directory of images, or tfds:NAME[:SPLIT] "
                     "with --data-dir")
