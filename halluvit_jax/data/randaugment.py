"""timm-compatible RandAugment (``rand-m9-mstd0.5-inc1`` etc.) in NumPy/OpenCV.

Re-implements the semantics of ``timm.data.auto_augment.rand_augment_transform`` (the DeiT
recipe) without PIL/torch, on RGB uint8 arrays:

* config string ``rand-m{M}-n{N}-mstd{S}-mmax{X}-inc{0|1}-p{P}`` (defaults: M=10, N=2, S=0,
  X=10, inc0, P=0.5), same parsing as timm;
* per image: choose N ops uniformly *with replacement*; each op is applied with probability P;
  its magnitude is drawn from N(M, S) and clipped to [0, X]; level->argument mappings are timm's
  (``_LEVEL_DENOM=10``), including the random sign of rotate/shear/translate/enhance;
* ``inc1`` selects timm's "increasing severity" op set (``_RAND_INCREASING_TRANSFORMS``).
* Geometric ops use bicubic resampling (as timm does when the train interpolation is bicubic) and
  fill with the ImageNet mean color ``round(255 * mean)`` like timm's ``img_mean`` hparam.

Pixel ops are LUTs (``cv2.LUT``) matching PIL's ``ImageOps`` exactly; enhance ops blend with the
same degenerate images PIL's ``ImageEnhance`` uses; geometric ops use ``cv2.warpAffine`` with
the exact PIL coordinate convention (pixel centers at +0.5). The only systematic difference from
PIL is OpenCV's bicubic kernel (a=-0.75 vs PIL's a=-0.5) -- tests bound it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import cv2
import numpy as np

from halluvit_jax.data.transforms import interpolation_flag

LEVEL_DENOM = 10.0

RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)

_IDENTITY = np.arange(256, dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Pixel ops (exact PIL ImageOps semantics).
# --------------------------------------------------------------------------------------------


def _apply_luts(img: np.ndarray, luts: list[np.ndarray]) -> np.ndarray:
    if all(lut is luts[0] for lut in luts):
        return cv2.LUT(img, luts[0])
    return cv2.LUT(img, np.stack(luts, axis=-1).reshape(256, 1, 3))


def _hists(img: np.ndarray) -> list[np.ndarray]:
    return [np.bincount(img[..., c].ravel(), minlength=256) for c in range(img.shape[-1])]


def auto_contrast(img: np.ndarray) -> np.ndarray:
    """``PIL.ImageOps.autocontrast(img)`` (cutoff 0)."""
    luts = []
    for h in _hists(img):
        nz = np.nonzero(h)[0]
        lo, hi = (int(nz[0]), int(nz[-1])) if len(nz) else (0, 0)
        if hi <= lo:
            luts.append(_IDENTITY)
            continue
        scale = 255.0 / (hi - lo)
        offset = -lo * scale
        ix = np.arange(256) * scale + offset
        ix = np.trunc(ix)  # PIL: int(ix * scale + offset)
        luts.append(np.clip(ix, 0, 255).astype(np.uint8))
    return _apply_luts(img, luts)


def equalize(img: np.ndarray) -> np.ndarray:
    """``PIL.ImageOps.equalize(img)``."""
    luts = []
    for h in _hists(img):
        histo = h[h > 0]
        if len(histo) <= 1:
            luts.append(_IDENTITY)
            continue
        step = (int(histo.sum()) - int(histo[-1])) // 255
        if not step:
            luts.append(_IDENTITY)
            continue
        n = step // 2 + np.concatenate([[0], np.cumsum(h)[:-1]])
        luts.append(np.minimum(n // step, 255).astype(np.uint8))
    return _apply_luts(img, luts)


def invert(img: np.ndarray) -> np.ndarray:
    return 255 - img


def posterize(img: np.ndarray, bits: int) -> np.ndarray:
    if bits >= 8:
        return img
    mask = ~(2 ** (8 - bits) - 1) & 0xFF
    return img & np.uint8(mask)


def solarize(img: np.ndarray, thresh: int) -> np.ndarray:
    lut = np.where(np.arange(256) < thresh, np.arange(256), 255 - np.arange(256)).astype(np.uint8)
    return cv2.LUT(img, lut)


def solarize_add(img: np.ndarray, add: int, thresh: int = 128) -> np.ndarray:
    i = np.arange(256)
    lut = np.where(i < thresh, np.minimum(255, i + add), i).astype(np.uint8)
    return cv2.LUT(img, lut)


def _gray_pil(img: np.ndarray) -> np.ndarray:
    """PIL's RGB->L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16."""
    x = img.astype(np.uint32)
    return ((x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16).astype(
        np.uint8)


def _blend(degenerate: np.ndarray, img: np.ndarray, factor: float) -> np.ndarray:
    """PIL ``Image.blend(degenerate, img, factor)``: truncating, clipped to [0, 255]."""
    out = cv2.addWeighted(img, float(factor), degenerate, 1.0 - float(factor), 0.0,
                          dtype=cv2.CV_32F)
    return np.clip(out, 0, 255).astype(np.uint8)


def color(img: np.ndarray, factor: float) -> np.ndarray:
    g = _gray_pil(img)
    return _blend(np.repeat(g[..., None], 3, axis=-1), img, factor)


def contrast(img: np.ndarray, factor: float) -> np.ndarray:
    mean = int(_gray_pil(img).mean() + 0.5)
    return _blend(np.full_like(img, mean), img, factor)


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
    return _blend(np.zeros_like(img), img, factor)


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0


def sharpness(img: np.ndarray, factor: float) -> np.ndarray:
    """PIL ``ImageEnhance.Sharpness``: blend with the SMOOTH-filtered image (borders kept)."""
    deg = cv2.filter2D(img, -1, _SMOOTH, borderType=cv2.BORDER_REPLICATE)
    deg[0, :], deg[-1, :], deg[:, 0], deg[:, -1] = img[0, :], img[-1, :], img[:, 0], img[:, -1]
    return _blend(deg, img, factor)


# --------------------------------------------------------------------------------------------
# Geometric ops (PIL affine convention: output pixel center (x+.5, y+.5) -> input coords).
# --------------------------------------------------------------------------------------------


def pil_affine(img: np.ndarray, matrix, fill, interp: int) -> np.ndarray:
    """``PIL.Image.transform(size, AFFINE, matrix, resample, fillcolor=fill)`` with OpenCV."""
    a, b, c, d, e, f = matrix
    m = np.array([[a, b, c + 0.5 * a + 0.5 * b - 0.5],
                  [d, e, f + 0.5 * d + 0.5 * e - 0.5]], np.float64)
    h, w = img.shape[:2]
    return cv2.warpAffine(img, m, (w, h), flags=interp | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=tuple(int(v) for v in fill))


def rotate(img, degrees, fill, interp):
    """``PIL.Image.rotate(degrees, resample, fillcolor)`` (counter-clockwise, about center)."""
    h, w = img.shape[:2]
    angle = -math.radians(degrees)
    m = [round(math.cos(angle), 15), round(math.sin(angle), 15), 0.0,
         round(-math.sin(angle), 15), round(math.cos(angle), 15), 0.0]
    cx, cy = w / 2.0, h / 2.0
    m[2] = m[0] * -cx + m[1] * -cy + m[2] + cx
    m[5] = m[3] * -cx + m[4] * -cy + m[5] + cy
    return pil_affine(img, m, fill, interp)


def shear_x(img, factor, fill, interp):
    return pil_affine(img, (1, factor, 0, 0, 1, 0), fill, interp)


def shear_y(img, factor, fill, interp):
    return pil_affine(img, (1, 0, 0, factor, 1, 0), fill, interp)


def translate_x_rel(img, pct, fill, interp):
    return pil_affine(img, (1, 0, pct * img.shape[1], 0, 1, 0), fill, interp)


def translate_y_rel(img, pct, fill, interp):
    return pil_affine(img, (1, 0, 0, 0, 1, pct * img.shape[0]), fill, interp)


# --------------------------------------------------------------------------------------------
# Level -> argument (timm), with explicit rng.
# --------------------------------------------------------------------------------------------


def _negate(v: float, rng: np.random.Generator) -> float:
    return -v if rng.random() > 0.5 else v


def _enhance_inc(level, rng):
    return (max(0.1, 1.0 + _negate(level / LEVEL_DENOM * 0.9, rng)),)


def _enhance(level, rng):
    return (level / LEVEL_DENOM * 1.8 + 0.1,)


_LEVEL_TO_ARG: dict[str, Callable | None] = {
    "AutoContrast": None,
    "Equalize": None,
    "Invert": None,
    "Rotate": lambda lv, rng: (_negate(lv / LEVEL_DENOM * 30.0, rng),),
    "Posterize": lambda lv, rng: (int(lv / LEVEL_DENOM * 4),),
    "PosterizeIncreasing": lambda lv, rng: (4 - int(lv / LEVEL_DENOM * 4),),
    "Solarize": lambda lv, rng: (min(256, int(lv / LEVEL_DENOM * 256)),),
    "SolarizeIncreasing": lambda lv, rng: (256 - min(256, int(lv / LEVEL_DENOM * 256)),),
    "SolarizeAdd": lambda lv, rng: (min(128, int(lv / LEVEL_DENOM * 110)),),
    "Color": _enhance,
    "ColorIncreasing": _enhance_inc,
    "Contrast": _enhance,
    "ContrastIncreasing": _enhance_inc,
    "Brightness": _enhance,
    "BrightnessIncreasing": _enhance_inc,
    "Sharpness": _enhance,
    "SharpnessIncreasing": _enhance_inc,
    "ShearX": lambda lv, rng: (_negate(lv / LEVEL_DENOM * 0.3, rng),),
    "ShearY": lambda lv, rng: (_negate(lv / LEVEL_DENOM * 0.3, rng),),
    "TranslateXRel": lambda lv, rng: (_negate(lv / LEVEL_DENOM * 0.45, rng),),
    "TranslateYRel": lambda lv, rng: (_negate(lv / LEVEL_DENOM * 0.45, rng),),
}

_GEOMETRIC = {"Rotate": rotate, "ShearX": shear_x, "ShearY": shear_y,
              "TranslateXRel": translate_x_rel, "TranslateYRel": translate_y_rel}
_PIXEL = {
    "AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert,
    "Posterize": posterize, "PosterizeIncreasing": posterize,
    "Solarize": solarize, "SolarizeIncreasing": solarize, "SolarizeAdd": solarize_add,
    "Color": color, "ColorIncreasing": color, "Contrast": contrast,
    "ContrastIncreasing": contrast, "Brightness": brightness, "BrightnessIncreasing": brightness,
    "Sharpness": sharpness, "SharpnessIncreasing": sharpness,
}


def apply_op(name: str, img: np.ndarray, args: tuple, *, fill=(124, 116, 104),
             interpolation: str = "bicubic") -> np.ndarray:
    """Applies op ``name`` with explicit (already level-mapped) arguments."""
    if name in _GEOMETRIC:
        return _GEOMETRIC[name](img, *args, fill, interpolation_flag(interpolation))
    return _PIXEL[name](img, *args)


class RandAugment:
    """timm RandAugment from a config string, e.g. ``RandAugment('rand-m9-mstd0.5-inc1')``.

    Call as ``aug(img_uint8_rgb, rng)``.
    """

    def __init__(self, config_str: str = "rand-m9-mstd0.5-inc1", *,
                 mean=(0.485, 0.456, 0.406), interpolation: str = "bicubic",
                 translate_pct: float = 0.45):
        parts = config_str.split("-")
        if parts[0] != "rand":
            raise ValueError(f"RandAugment config must start with 'rand': {config_str!r}")
        self.magnitude, self.num_layers, self.prob = 10.0, 2, 0.5
        self.magnitude_std, self.magnitude_max, increasing = 0.0, None, False
        for c in parts[1:]:
            cs = re.split(r"(\d.*)", c)
            if len(cs) < 2:
                continue
            key, val = cs[:2]
            if key == "mstd":
                self.magnitude_std = float(val) if float(val) <= 100 else float("inf")
            elif key == "mmax":
                self.magnitude_max = int(val)
            elif key == "inc":
                increasing = bool(int(val))
            elif key == "m":
                self.magnitude = float(int(val))
            elif key == "n":
                self.num_layers = int(val)
            elif key == "p":
                self.prob = float(val)
            else:
                raise ValueError(f"Unknown RandAugment config section {c!r} in {config_str!r}")
        self.ops = RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS
        self.fill = tuple(min(255, round(255 * m)) for m in mean)
        self.interpolation = interpolation
        self.translate_pct = translate_pct
        self.config_str = config_str

    def __repr__(self):
        return f"RandAugment({self.config_str!r})"

    def sample_magnitude(self, rng: np.random.Generator) -> float:
        m = self.magnitude
        if self.magnitude_std == float("inf"):
            m = rng.uniform(0, m)
        elif self.magnitude_std > 0:
            m = rng.normal(m, self.magnitude_std)
        upper = self.magnitude_max or LEVEL_DENOM
        return max(0.0, min(m, upper))

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        img = np.ascontiguousarray(img)
        for k in rng.integers(0, len(self.ops), size=self.num_layers):
            name = self.ops[int(k)]
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            level_fn = _LEVEL_TO_ARG[name]
            args = level_fn(self.sample_magnitude(rng), rng) if level_fn is not None else ()
            if name in ("TranslateXRel", "TranslateYRel") and self.translate_pct != 0.45:
                args = (args[0] / 0.45 * self.translate_pct,)
            img = apply_op(name, img, args, fill=self.fill, interpolation=self.interpolation)
        return img
