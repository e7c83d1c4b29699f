"""Config-selectable per-image ops and their composition into a record preprocessor.

Syntax: a '|'-separated string or a list of op strings; each op is ``name`` or
``name(arg, key=value, ...)``. Values are numbers, ranges ``lo-hi`` (e.g. ``scale=0.08-1``) or
bare strings. Ops (``size`` defaults to ``image_size``, ``interpolation`` to the config's):

======================  =====================================================================
``decode(fast=0)``       full decode to RGB uint8 (implicit before the first array op)
``rrc(scale=a-b, ratio=c-d, max_upscale=1, fast=2)``  RandomResizedCrop (timm/torchvision
                        parameters; default scale 0.08-1, ratio 3/4-4/3), decoding the JPEG at
                        1/2-1/8 size when the crop is large enough (``max_upscale=2`` also
                        when the reduced crop is up to 2x smaller than the output: faster,
                        slightly blurrier)
``resize_crop(crop_pct=p, fast=0)``  eval: resize shorter side to ``floor(size/p)``, center
                        crop ``size`` (default ``p`` = config ``crop_pct``)
``resize(size)``        resize to ``size x size`` (ignores aspect)
``center_crop(size)``   torchvision CenterCrop
``flip(p=0.5)``         horizontal flip with probability p
``randaug(cfg)``        timm RandAugment, default config ``randaugment`` ('' disables)
``normalize``           ``(x/255 - mean) / std`` -> float32 (config ``mean``/``std``);
                        ``normalize(on_device=1)`` instead emits uint8 images, to be
                        normalized in the jitted step by :func:`normalize_on_device`
``erase(p=.., mode=pixel, max_count=1)``  timm RandomErasing on the normalized image
                        (default p = config ``random_erase``; must follow ``normalize``)
======================  =====================================================================

Without ``normalize`` the output is the uint8 image cast to float32 (0..255).

``fast`` of the decoding ops: 0 = accurate JPEG decoding (as PIL/OpenCV), 1 = fast integer
IDCT (tf.data's default), 2 = fast IDCT + fast chroma upsampling (train default, ~25 % cheaper
decode); see :mod:`halluvit_jax.data.transforms`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from halluvit_jax.data import transforms as T
from halluvit_jax.data.randaugment import RandAugment

logger = logging.getLogger("halluvit_jax.data")

_OP_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$")
_RANGE_RE = re.compile(r"^\s*([0-9.]+(?:e-?\d+)?)\s*-\s*([0-9.]+(?:e-?\d+)?)\s*$")

#: ops that consume encoded bytes (and decode themselves)
_DECODING_OPS = {"decode", "rrc", "resize_crop"}
KNOWN_OPS = {"decode", "rrc", "resize_crop", "resize", "center_crop", "flip", "randaug",
             "normalize", "erase"}


@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)


def _parse_value(s: str) -> Any:
    s = s.strip()
    m = _RANGE_RE.match(s)
    if m:
        return (float(m.group(1)), float(m.group(2)))
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return s


def parse_ops(ops: str | Sequence[str] | None) -> list[OpSpec]:
    """Parses ``'rrc(scale=0.08-1)|flip|normalize'`` or a list of such strings."""
    if ops is None:
        return []
    items = ops.split("|") if isinstance(ops, str) else [o for op in ops for o in op.split("|")]
    specs = []
    for item in items:
        if not item.strip():
            continue
        m = _OP_RE.match(item)
        if not m:
            raise ValueError(f"Cannot parse op {item!r} (syntax: name or name(k=v, ...))")
        name, argstr = m.group(1), m.group(2)
        if name not in KNOWN_OPS:
            raise ValueError(f"Unknown op {name!r} in {ops!r}; known: {sorted(KNOWN_OPS)}")
        args, kwargs = [], {}
        if name == "randaug" and argstr and "=" not in argstr:
            args = [argstr.strip()]  # 'rand-m9-mstd0.5-inc1' contains '-': keep verbatim
        elif argstr and argstr.strip():
            for part in argstr.split(","):
                if "=" in part:
                    k, v = part.split("=", 1)
                    kwargs[k.strip()] = _parse_value(v)
                else:
                    args.append(_parse_value(part))
        specs.append(OpSpec(name, tuple(args), kwargs))
    return specs


# Read-time decode failures (should not happen on data prepared by our builders, which skip
# corrupt images; kept so that a bad record never crashes a training run).
_failures_lock = threading.Lock()
_decode_failures = 0


def decode_failures() -> int:
    """Number of records that could not be decoded at read time (skipped/masked)."""
    return _decode_failures


def count_decode_failure(record) -> None:
    """Counts a record that could not be decoded (logged for the first 10, then every 1000th)."""
    global _decode_failures
    with _failures_lock:
        _decode_failures += 1
        n = _decode_failures
    if n <= 10 or n % 1000 == 0:
        name = record.get("file_name", b"?")
        logger.warning("Could not decode image %r; skipped (%d so far).", name, n)


class Preprocessor:
    """Callable ``(record, rng) -> {'image': f32 [S, S, 3], 'label': int32} | None``.

    ``None`` means the record could not be decoded (counted in :func:`decode_failures`).
    """

    def __init__(self, ops: str | Sequence[str], cfg, *, size: int | None = None):
        self.specs = parse_ops(ops)
        self.size = int(size or cfg.image_size)
        self.cfg = cfg
        self._fns = []
        self.on_device = False  # set by 'normalize(on_device=1)'
        normalized = False
        for i, spec in enumerate(self.specs):
            if spec.name in _DECODING_OPS and i > 0 and not (
                    i == 1 and self.specs[0].name == "decode" and spec.name != "decode"):
                raise ValueError(f"Op {spec.name!r} must be the first op (it decodes the image)")
            if spec.name in ("flip", "randaug", "resize", "center_crop") and normalized:
                raise ValueError(f"Op {spec.name!r} must come before 'normalize'")
            if spec.name == "erase" and not normalized:
                raise ValueError("Op 'erase' must come after 'normalize' (as in timm)")
            if spec.name == "erase" and self.on_device:
                raise ValueError("Op 'erase' needs host normalization: use 'normalize', not "
                                 "'normalize(on_device=1)', or drop 'erase'")
            fn = self._build(spec)
            normalized |= spec.name == "normalize"
            if fn is not None:
                self._fns.append(fn)
        self.normalized = normalized
        #: dtype of the emitted images: uint8 with 'normalize(on_device=1)', else float32
        self.dtype = np.uint8 if self.on_device else np.float32
        self.decodes_first = bool(self.specs) and self.specs[0].name in _DECODING_OPS

    def _build(self, spec: OpSpec):
        cfg, kw = self.cfg, dict(spec.kwargs)
        interp = kw.pop("interpolation", cfg.interpolation)
        size = int(kw.pop("size", spec.args[0] if spec.args and spec.name in (
            "resize", "center_crop") else self.size))
        n = spec.name
        if n == "decode":
            fast = _fast_arg(spec, kw, 0)
            _no_extra(spec, kw)
            return lambda x, rng: T.decode(x, fast=fast)
        if n == "rrc":
            scale = tuple(kw.pop("scale", (0.08, 1.0)))
            ratio = tuple(kw.pop("ratio", (3 / 4, 4 / 3)))
            max_up = float(kw.pop("max_upscale", 1.0))
            fast = _fast_arg(spec, kw, TRAIN_FAST_DECODE)
            _no_extra(spec, kw)
            return lambda x, rng: T.random_resized_crop(
                x, rng, size, scale=scale, ratio=ratio, interpolation=interp, max_upscale=max_up,
                fast=fast)
        if n == "resize_crop":
            crop_pct = float(kw.pop("crop_pct", spec.args[0] if spec.args else cfg.crop_pct))
            fast = _fast_arg(spec, kw, 0)
            _no_extra(spec, kw)
            return lambda x, rng: T.resize_center_crop(x, size, crop_pct, interp, fast=fast)
        if n == "resize":
            _no_extra(spec, kw)
            return lambda x, rng: T.resize(x, size, interp)
        if n == "center_crop":
            _no_extra(spec, kw)
            return lambda x, rng: T.center_crop(x, size)
        if n == "flip":
            p = float(kw.pop("p", spec.args[0] if spec.args else 0.5))
            _no_extra(spec, kw)
            return lambda x, rng: T.hflip(x, rng, p)
        if n == "randaug":
            conf = spec.args[0] if spec.args else kw.pop("config", cfg.randaugment)
            if not conf:
                return None
            ra = RandAugment(conf, mean=cfg.mean, interpolation=interp)
            return lambda x, rng: ra(x, rng)
        if n == "normalize":
            if int(kw.pop("on_device", 0)):
                _no_extra(spec, kw)
                self.on_device = True
                return None  # emit uint8; the train/eval step calls normalize_on_device
            _no_extra(spec, kw)
            norm = T.Normalizer(tuple(cfg.mean), tuple(cfg.std))
            return lambda x, rng: norm(x)
        if n == "erase":
            p = float(kw.pop("p", spec.args[0] if spec.args else cfg.random_erase))
            mode = str(kw.pop("mode", "pixel"))
            max_count = int(kw.pop("max_count", 1))
            _no_extra(spec, kw)
            if p <= 0:
                return None
            return lambda x, rng: T.random_erase(x, rng, p, mode=mode, max_count=max_count)
        raise AssertionError(n)

    def apply(self, image_bytes: bytes, rng: np.random.Generator) -> np.ndarray | None:
        """Runs the ops on encoded bytes; ``[S, S, 3]`` of ``self.dtype`` or None if undecodable."""
        x: Any = image_bytes
        if not self.decodes_first:
            x = T.decode(image_bytes)
            if x is None:
                return None
        for fn in self._fns:
            x = fn(x, rng)
            if x is None:
                return None
        x = np.asarray(x, dtype=self.dtype)
        if x.shape != (self.size, self.size, 3):
            raise ValueError(f"ops {[s.name for s in self.specs]} produced shape {x.shape}, "
                             f"expected {(self.size, self.size, 3)}; add a crop/resize op")
        return x

    def __call__(self, record: dict, rng: np.random.Generator) -> dict | None:
        image = self.apply(record["image"], rng)
        if image is None:
            count_decode_failure(record)
            return None
        return {"image": image, "label": np.int32(record["label"])}


def normalize_on_device(images, mean, std, dtype=None):
    """``(images/255 - mean) / std`` in JAX, for uint8 batches from 'normalize(on_device=1)'.

    Call it inside the jitted train/eval step: the host then ships uint8 (4x fewer bytes) and
    skips the per-image float conversion. ``dtype``: result dtype (default float32).
    """
    mean255 = jnp.asarray(mean, jnp.float32) * 255.0
    inv = 1.0 / (jnp.asarray(std, jnp.float32) * 255.0)
    out = (images.astype(jnp.float32) - mean255) * inv
    return out.astype(dtype) if dtype is not None else out


#: default ``fast`` of op ``rrc`` (train): fast integer IDCT + chroma replication, see
#: :func:`halluvit_jax.data.transforms.decode`. Eval ops default to 0 (accurate, as PIL/timm).
TRAIN_FAST_DECODE = 2


def _fast_arg(spec: OpSpec, kw: dict, default: int) -> int:
    fast = int(kw.pop("fast", default))
    if fast not in (0, 1, 2):
        raise ValueError(f"Op {spec.name!r}: fast={fast} must be 0 (accurate), 1 (fast IDCT) or "
                         "2 (fast IDCT + fast chroma upsampling)")
    return fast


def _no_extra(spec: OpSpec, kw: dict) -> None:
    if kw:
        raise ValueError(f"Unknown arguments {sorted(kw)} for op {spec.name!r}")
