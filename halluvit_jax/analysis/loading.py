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

import dataclasses
import glob
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclasses.dataclass
class Loaded:
    """A model ready for ``model.apply(variables, x)`` and how to preprocess its input."""

    name: str
    model: Any
    variables: dict[str, Any]
    image_size: int
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str


def _has_training_branches(params: Any) -> bool:
    import jax

    return any("branch_kernel" in jax.tree_util.keystr(p)
               for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def _workdir_of(path: str) -> str | None:
    """The training workdir holding ``path`` (a workdir, checkpoints/ or a step dir), if any."""
    path = os.path.abspath(path)
    for cand in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        if os.path.isfile(os.path.join(cand, "config.json")):
            return cand
    return None


def _num_classes(params: Any) -> int | None:
    head = params.get("head") if isinstance(params, dict) else None
    if isinstance(head, dict) and "kernel" in head:
        return int(np.shape(head["kernel"])[-1])
    return 0 if isinstance(params, dict) else None


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``['depth=4', 'hal_variant=chh']`` -> ``{'depth': 4, 'hal_variant': 'chh'}`` (JSON values)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"Bad --set {item!r}; write FIELD=VALUE, e.g. --set depth=4.")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def load_model(checkpoint: str, *, model: str | None = None, overrides: dict[str, Any] | None = None,
               use_ema: bool = False, step: int | None = None) -> Loaded:
    """Model + variables of a training or converted checkpoint (see the module docstring)."""
    from halluvit_jax.models import create_model, deploy_form, get_input_config, list_models
    from halluvit_jax.train import checkpointing

    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"Checkpoint {checkpoint!r} does not exist; pass a training workdir "
                                "or a converted checkpoint directory (with model_card.json).")
    name, fields, inp = None, {}, {}
    if checkpointing.is_converted_checkpoint(checkpoint):
        from halluvit_jax.convert.io import load_variables

        variables, card = load_variables(checkpoint)
        name, fields, inp = card.get("model"), dict(card.get("overrides") or {}), dict(card.get("input") or {})
        source = f"converted:{os.path.abspath(checkpoint)}"
    else:
        root, step = checkpointing.find_checkpoint(checkpoint, step)
        state = checkpointing.load_state_as_numpy(root, step)
        variables = checkpointing.state_variables(state, use_ema=use_ema, where=f"{root}/{step}")
        workdir = _workdir_of(checkpoint)
        if workdir:
            with open(os.path.join(workdir, "config.json")) as f:
                config = json.load(f)
            name, fields = config.get("model_name"), dict(config.get("model") or {})
            ci = config.get("input") or {}
            inp = {"input_size": ci.get("image_size"), "crop_pct": ci.get("crop_pct"),
                   "mean": ci.get("mean"), "std": ci.get("std")}
        source = f"training:{root}/{step}"
    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    name = model or name
    if not name:
        raise ValueError(f"Cannot tell the architecture of {checkpoint!r}; pass --model NAME "
                         f"(one of {', '.join(list_models())}).")
    fields.update(overrides or {})
    num_classes = _num_classes(variables["params"])
    if num_classes is not None and "num_classes" not in fields:
        fields["num_classes"] = num_classes
    try:
        net = create_model(name, **fields)
    except (TypeError, KeyError, ValueError) as err:
        raise ValueError(f"Cannot build {name!r} with {fields}: {err}. Check --model / --set.") from None
    if not _has_training_branches(variables["params"]):
        net = deploy_form(net)
    default = get_input_config(name)
    size = int(inp.get("input_size") or getattr(net, "img_size", None) or default.input_size)
    return Loaded(
        name=name, model=net, variables=variables, image_size=size,
        crop_pct=float(inp.get("crop_pct") or default.crop_pct),
        mean=tuple(inp.get("mean") or default.mean), std=tuple(inp.get("std") or default.std),
        source=source,
    )


def preprocess_file(path: str, loaded: Loaded) -> tuple[np.ndarray, np.ndarray]:
    """(normalized float32 ``[S, S, 3]``, the uint8 crop it came from) of one image file."""
    from halluvit_jax.data import transforms

    with open(path, "rb") as f:
        data = f.read()
    img = transforms.decode(data)
    if img is None:
        raise ValueError(f"Cannot decode image {path!r}; pass a PNG or JPEG file.")
    crop = transforms.resize_center_crop(img, loaded.image_size, loaded.crop_pct)
    crop = np.asarray(crop, np.uint8)
    norm = (crop.astype(np.float32) / 255.0 - np.asarray(loaded.mean, np.float32)) / np.asarray(loaded.std, np.float32)
    return norm.astype(np.float32), crop


def demo_images(split: str = "validation") -> np.ndarray:
    """The embedded digits of ``split`` as uint8 ``[N, 32, 32, 3]`` (same pixels as the TFDS demo)."""
    from halluvit_jax.data import demo

    idx = demo.split_indices()
    if split not in idx:
        raise ValueError(f"The demo has splits {sorted(idx)}, not {split!r}.")
    images, _ = demo._digits()
    return np.stack([demo.upscale_digit(images[i]) for i in idx[split]])


def iter_batches(data: str, loaded: Loaded, *, batch_size: int = 64, data_dir: str | None = None,
                 max_images: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Normalized ``{'image', 'mask'}`` batches of ``data`` (see the module docstring)."""
    mean = np.asarray(loaded.mean, np.float32)
    std = np.asarray(loaded.std, np.float32)

    def chunks(arrays: np.ndarray):
        for i in range(0, len(arrays), batch_size):
            x = arrays[i:i + batch_size]
            yield {"image": x, "mask": np.ones(len(x), bool)}

    if data == "demo":
        imgs = demo_images()[:max_images]
        if imgs.shape[1] != loaded.image_size:
            from halluvit_jax.data import transforms

            imgs = np.stack([transforms.resize(im, loaded.image_size) for im in imgs])
        yield from chunks(((imgs.astype(np.float32) / 255.0 - mean) / std).astype(np.float32))
        return
    if data.startswith("tfds:"):
        from halluvit_jax.data import pipeline
        from halluvit_jax.data.config import default_input_config

        parts = data.split(":")
        cfg = default_input_config()
        cfg.dataset = parts[1]
        cfg.eval_split = parts[2] if len(parts) > 2 and parts[2] else "validation"
        cfg.data_dir = data_dir
        cfg.image_size = loaded.image_size
        cfg.crop_pct = loaded.crop_pct
        cfg.mean, cfg.std = tuple(loaded.mean), tuple(loaded.std)
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
            raise ValueError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in {data!r}.")
        files = files[:max_images]
        for i in range(0, len(files), batch_size):
            x = np.stack([preprocess_file(f, loaded)[0] for f in files[i:i + batch_size]])
            yield {"image": x, "mask": np.ones(len(x), bool)}
        return
    raise ValueError(f"Unknown --data {data!r}; use 'demo', a directory of images, or tfds:NAME[:SPLIT] "
                     "with --data-dir.")
