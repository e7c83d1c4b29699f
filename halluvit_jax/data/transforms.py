"""Per-image preprocessing primitives (NumPy + OpenCV), used by :mod:`halluvit_jax.data.ops`.

All randomness comes from an explicit ``np.random.Generator`` (grain hands one per element,
derived from the seed and the element index), so every op is deterministic and resumable.

Decoding is done with OpenCV at *reduced size* when the crop allows: libjpeg can decode at
1/2, 1/4, 1/8 scale in the DCT domain (``cv2.IMREAD_REDUCED_COLOR_*``) which is several times
cheaper than a full decode followed by a large downscale. We only reduce while the region we
need still has at least the output resolution, so the subsequent resize never upsamples more
than the full-resolution path would.
"""

from __future__ import annotations

import math
import struct

import cv2
import numpy as np

INTERPOLATIONS = {
    "bicubic": cv2.INTER_CUBIC,
    "bilinear": cv2.INTER_LINEAR,
    "nearest": cv2.INTER_NEAREST,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}

# Decode straight to RGB (libjpeg color-converts to RGB: no extra BGR->RGB pass), at 1/r scale,
# ignoring EXIF orientation like tf.image.decode_jpeg / TFDS.
_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
if _RGB is not None:
    _DECODE_FLAGS = {r: ((f & ~cv2.IMREAD_COLOR) | _RGB | cv2.IMREAD_IGNORE_ORIENTATION)
                     for r, f in ((1, cv2.IMREAD_COLOR), (2, cv2.IMREAD_REDUCED_COLOR_2),
                                  (4, cv2.IMREAD_REDUCED_COLOR_4),
                                  (8, cv2.IMREAD_REDUCED_COLOR_8))}
else:  # OpenCV < 4.10: decode BGR and convert
    _DECODE_FLAGS = {r: f | cv2.IMREAD_IGNORE_ORIENTATION
                     for r, f in ((1, cv2.IMREAD_COLOR), (2, cv2.IMREAD_REDUCED_COLOR_2),
                                  (4, cv2.IMREAD_REDUCED_COLOR_4),
                                  (8, cv2.IMREAD_REDUCED_COLOR_8))}


def interpolation_flag(name: str) -> int:
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        raise ValueError(f"Unknown interpolation {name!r}; choose from {sorted(INTERPOLATIONS)}")


# --------------------------------------------------------------------------------------------
# Header parsing and decoding.
# --------------------------------------------------------------------------------------------

_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def image_header_size(data: bytes) -> tuple[str, int, int] | None:
    """Returns ``(format, height, width)`` from a JPEG/PNG header without decoding, else None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return "png", h, w
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (seg_len,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in _SOF_MARKERS:
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return "jpeg", h, w
        i += 2 + seg_len
    return None


def decode(data: bytes, reduce: int = 1) -> np.ndarray | None:
    """Decodes to RGB uint8 ``[H, W, 3]`` (1/``reduce`` scale for JPEG); None if undecodable."""
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), _DECODE_FLAGS[reduce])
    except cv2.error:
        return None
    if img is None or img.ndim != 3:
        return None
    if _RGB is None:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


def choose_reduction(fmt: str | None, needed_h: float, needed_w: float, out_h: int,
                     out_w: int, max_upscale: float = 1.0) -> int:
    """Largest factor in {1,2,4,8} keeping the needed region >= the output size (JPEG only).

    ``max_upscale > 1`` trades quality for speed: the reduced region may be up to that factor
    smaller than the output (it is then upsampled). The default 1.0 never upsamples more than
    decoding at full resolution would.
    """
    if fmt != "jpeg":
        return 1
    r = 1
    for cand in (2, 4, 8):
        if needed_h * max_upscale / cand >= out_h and needed_w * max_upscale / cand >= out_w:
            r = cand
    return r


def _resize(img: np.ndarray, h: int, w: int, interp: int) -> np.ndarray:
    if img.shape[0] == h and img.shape[1] == w:
        return img
    return cv2.resize(img, (w, h), interpolation=interp)


# --------------------------------------------------------------------------------------------
# Crops.
# --------------------------------------------------------------------------------------------


def rrc_params(rng: np.random.Generator, height: int, width: int,
               scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)) -> tuple[int, int, int, int]:
    """torchvision/timm ``RandomResizedCrop.get_params``: returns ``(top, left, h, w)``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: central crop with the aspect ratio clamped into `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _crop_from_encoded(data: bytes, box_fn, out_h: int, out_w: int, interp: int,
                       max_upscale: float = 1.0):
    """Decodes (reduced if possible), crops ``box_fn(H, W) -> (top, left, h, w)``, resizes, RGB."""
    header = image_header_size(data)
    if header is None:
        img = decode(data)
        if img is None:
            return None
        fmt, H, W = None, img.shape[0], img.shape[1]
    else:
        fmt, H, W = header
        img = None
    top, left, h, w = box_fn(H, W)
    if img is None:
        r = choose_reduction(fmt, h, w, out_h, out_w, max_upscale)
        img = decode(data, r)
        if img is None:
            return None
        if r > 1:
            sy, sx = img.shape[0] / H, img.shape[1] / W
            y0, x0 = math.floor(top * sy), math.floor(left * sx)
            y1 = min(img.shape[0], max(y0 + 1, round((top + h) * sy)))
            x1 = min(img.shape[1], max(x0 + 1, round((left + w) * sx)))
            return _resize(img[y0:y1, x0:x1], out_h, out_w, interp)
        if img.shape[:2] != (H, W):  # header lied; trust the pixels
            H, W = img.shape[:2]
            top, left, h, w = box_fn(H, W)
    return _resize(img[top:top + h, left:left + w], out_h, out_w, interp)


def random_resized_crop(data_or_img, rng: np.random.Generator, size: int, *,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bicubic",
                        max_upscale: float = 1.0):
    """timm ``RandomResizedCropAndInterpolation`` on encoded bytes (reduced decode) or RGB array.

    ``max_upscale``: see :func:`choose_reduction` (1.0 = quality-neutral reduced decoding).
    """
    interp = interpolation_flag(interpolation)
    box_fn = lambda H, W: rrc_params(rng, H, W, scale, ratio)
    if isinstance(data_or_img, (bytes, bytearray, memoryview)):
        return _crop_from_encoded(bytes(data_or_img), box_fn, size, size, interp, max_upscale)
    img = data_or_img
    top, left, h, w = box_fn(img.shape[0], img.shape[1])
    return _resize(img[top:top + h, left:left + w], size, size, interp)


def resize_center_crop(data_or_img, size: int, crop_pct: float, interpolation="bicubic"):
    """timm eval transform: ``Resize(floor(size/crop_pct))`` (shorter side) + ``CenterCrop(size)``.

    Implemented as resize-then-crop on the (possibly reduced) decoded image, which gives exactly
    torchvision's geometry: the output is the center ``size x size`` window of the image resized
    so that its shorter side is ``floor(size / crop_pct)``.
    """
    interp = interpolation_flag(interpolation)
    scale_size = math.floor(size / crop_pct)
    if isinstance(data_or_img, (bytes, bytearray, memoryview)):
        data = bytes(data_or_img)
        header = image_header_size(data)
        r = 1
        if header is not None:
            fmt, H, W = header
            r = choose_reduction(fmt, min(H, W), min(H, W), scale_size, scale_size)
        img = decode(data, r)
        if img is None:
            return None
        return _resize_crop_array(img, size, scale_size, interp)
    return _resize_crop_array(data_or_img, size, scale_size, interp)


def _resize_crop_array(img: np.ndarray, size: int, scale_size: int, interp: int) -> np.ndarray:
    H, W = img.shape[:2]
    if H <= W:
        rh, rw = scale_size, int(scale_size * W / H)
    else:
        rh, rw = int(scale_size * H / W), scale_size
    img = _resize(img, rh, rw, interp)
    top = round((rh - size) / 2.0)
    left = round((rw - size) / 2.0)
    if top < 0 or left < 0:  # crop larger than the resized image (crop_pct > 1): pad with 0
        pad_t, pad_l = max(0, -top), max(0, -left)
        img = cv2.copyMakeBorder(img, pad_t, max(0, size - rh - pad_t), pad_l,
                                 max(0, size - rw - pad_l), cv2.BORDER_CONSTANT, value=0)
        top, left = max(0, top), max(0, left)
    return img[top:top + size, left:left + size]


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``CenterCrop`` on an array at least ``size`` on each side."""
    H, W = img.shape[:2]
    top = round((H - size) / 2.0)
    left = round((W - size) / 2.0)
    return img[top:top + size, left:left + size]


def resize(img: np.ndarray, size: int, interpolation="bicubic") -> np.ndarray:
    """Resize to ``size x size`` (no aspect preservation)."""
    return _resize(img, size, size, interpolation_flag(interpolation))


# --------------------------------------------------------------------------------------------
# Flip, normalize, erase.
# --------------------------------------------------------------------------------------------


def hflip(img: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Horizontal flip with probability ``p`` (a contiguous copy, cheaper downstream)."""
    if rng.random() < p:
        return cv2.flip(img, 1)
    return img


def normalize(img: np.ndarray, mean, std) -> np.ndarray:
    """uint8 RGB -> float32 ``(img / 255 - mean) / std``."""
    return Normalizer(mean, std)(img)


class Normalizer:
    """Precomputed ``(x/255 - mean) / std`` (avoids per-call constant setup)."""

    def __init__(self, mean, std):
        self.mean255 = np.asarray(mean, np.float32) * np.float32(255.0)
        self.inv = np.float32(1.0) / (np.asarray(std, np.float32) * np.float32(255.0))

        self._m = tuple(float(v) for v in self.mean255) + (0.0,)
        self._s = tuple(float(v) for v in self.inv) + (0.0,)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        if img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3:
            img = np.ascontiguousarray(img)
            out = cv2.subtract(img, self._m, dtype=cv2.CV_32F)  # ~2.5x faster than NumPy
            return cv2.multiply(out, self._s)
        out = img.astype(np.float32)
        out -= self.mean255
        out *= self.inv
        return out


def random_erase(img: np.ndarray, rng: np.random.Generator, p: float = 0.25, *,
                 min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
                 max_aspect: float | None = None, min_count: int = 1, max_count: int = 1,
                 mode: str = "pixel") -> np.ndarray:
    """timm ``RandomErasing`` (applied to the *normalized* float image, as timm does).

    ``mode='pixel'``: per-pixel N(0, 1) noise; ``'rand'``: one N(0,1) color per region;
    ``'const'``: zeros. Modifies a copy; returns float32.
    """
    if rng.random() > p:
        return img
    img = np.array(img, dtype=np.float32, copy=True)
    H, W, C = img.shape
    area = H * W
    max_aspect = max_aspect or 1 / min_aspect
    log_ar = (math.log(min_aspect), math.log(max_aspect))
    count = min_count if min_count == max_count else int(rng.integers(min_count, max_count + 1))
    for _ in range(count):
        for _attempt in range(10):
            target_area = rng.uniform(min_area, max_area) * area / count
            ar = math.exp(rng.uniform(*log_ar))
            h = round(math.sqrt(target_area * ar))
            w = round(math.sqrt(target_area / ar))
            if w < W and h < H:
                top = int(rng.integers(0, H - h + 1))
                left = int(rng.integers(0, W - w + 1))
                if mode == "pixel":
                    fill = rng.standard_normal((h, w, C), dtype=np.float32)
                elif mode == "rand":
                    fill = rng.standard_normal((1, 1, C), dtype=np.float32)
                else:
                    fill = 0.0
                img[top:top + h, left:left + w] = fill
                break
    return img
