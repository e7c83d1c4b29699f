"""Build a model and its variables from a checkpoint, and the images to analyse.

Checkpoints: a training workdir (or its ``checkpoints/`` or a step directory; the architecture
is read from the workdir's ``config.json``) or a converted/exported directory with a
``model_card.json``. ``--model`` and ``--set field=value`` override what the checkpoint says.

Data (``--data``): ``demo`` (the embedded digits' validation split, built in memory from
scikit-learn; no preparation), a directory of image files (``*.png``, ``*.jpg``, ``*.jpeg``,
sorted by name), or ``tfds:NAME[:SPLIT]`` with ``--data-dir`` (a prepared TFDS dataset, read
with the package's eval pipeline; split default ``validation``).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from halluvit_jax.cli import UsageError
from halluvit_jax.data import demo, pipeline, transforms
from halluvit_jax.data.config import default_input_config
from halluvit_jax.loading import Loaded, load

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``['depth=4', 'hal_variant=chh']`` -> ``{'depth': 4, 'hal_variant': 'chh'}`` (JSON values)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"bad --set {item!r}; write FIELD=VALUE, e.g. --set depth=4")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def load_model(checkpoint: str, *, model: str | None = None, overrides: dict[str, Any] | None = None,
               use_ema: bool = False, step: int | None = None) -> Loaded:
    """Model + variables of a training or converted checkpoint: :func:`halluvit_jax.load` (which
    verifies that they fit), with ``--model`` / ``--set`` overrides."""
    return load(checkpoint, ema=use_ema, step=step, model=model, overrides=overrides)


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
    images, _ = demo._digits()
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
