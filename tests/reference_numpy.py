"""Float64 NumPy references written from the formulas, for the layer tests.

Nothing here calls jax, lax or flax: convolutions are explicit sums over the kernel taps of
shifted slices of a zero-padded input (correlation, as `lax.conv_general_dilated` and PyTorch
compute it), and the norms, softmax, GELU, attention, IHH and CHH are their textbook formulas
(docs/design.md for the hMHSA ones). Gradients come from `numeric_grad` (central differences in
float64) or, where the formula is short, are written out by hand. Every function takes and
returns float64 arrays (inputs are converted).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Convolutions (stride 1, zero "same" padding, correlation).


def conv2d_same(x, kernel, groups: int = 1) -> np.ndarray:
    """NHWC input, HWIO kernel ``[kh, kw, C / groups, O]``: ``out[b, i, j, o] = sum over (di, dj)
    and the input channels c of o's group of x[b, i + di - kh // 2, j + dj - kw // 2, c] *
    kernel[di, dj, c - group start, o]`` (zero outside the image)."""
    x, kernel = f64(x), f64(kernel)
    b, h, w, c = x.shape
    kh, kw, cin, cout = kernel.shape
    assert c == cin * groups and cout % groups == 0, (x.shape, kernel.shape, groups)
    ph, pw = kh // 2, kw // 2
    padded = np.zeros((b, h + 2 * ph, w + 2 * pw, c))
    padded[:, ph:ph + h, pw:pw + w] = x
    out = np.zeros((b, h, w, cout))
    per_group = cout // groups
    for g in range(groups):
        cs, os_ = slice(g * cin, (g + 1) * cin), slice(g * per_group, (g + 1) * per_group)
        for di in range(kh):
            for dj in range(kw):
                shifted = padded[:, di:di + h, dj:dj + w, cs]  # [b, h, w, cin]
                out[..., os_] += shifted @ kernel[di, dj, :, os_]
    return out


def depthwise_conv2d_same(maps, kernel) -> np.ndarray:
    """Per-channel conv of NHWC ``maps`` [B, H, W, C] with ``kernel`` [kh, kw, C], as shifted
    slices times the tap's per-channel weight."""
    maps, kernel = f64(maps), f64(kernel)
    b, h, w, c = maps.shape
    kh, kw, kc = kernel.shape
    assert kc == c
    ph, pw = kh // 2, kw // 2
    padded = np.zeros((b, h + 2 * ph, w + 2 * pw, c))
    padded[:, ph:ph + h, pw:pw + w] = maps
    out = np.zeros_like(maps)
    for di in range(kh):
        for dj in range(kw):
            out += padded[:, di:di + h, dj:dj + w] * kernel[di, dj]
    return out


# --------------------------------------------------------------------------------------------
# hMHSA: IHH and CHH on heads-first logits [B, H, N, Nk].


def intra_head_hallucination(logits, kernel, bias, grid: Sequence[int], num_prefix: int) -> np.ndarray:
    """IHH: each head's logits over the key grid ``(hk, wk)`` convolved with that head's 3x3
    kernel ``[H, 3, 3]`` plus its bias; the first ``num_prefix`` key columns (class token)
    pass through unchanged."""
    logits, kernel, bias = f64(logits), f64(kernel), f64(bias)
    b, h, n, nk = logits.shape
    hk, wk = grid
    assert nk == num_prefix + hk * wk
    maps = logits[..., num_prefix:].reshape(b, h, n, hk, wk)
    maps = np.moveaxis(maps, 1, -1).reshape(b * n, hk, wk, h)  # heads as channels
    conv = depthwise_conv2d_same(maps, np.moveaxis(kernel, 0, -1)) + bias
    conv = np.moveaxis(conv.reshape(b, n, hk, wk, h), -1, 1).reshape(b, h, n, hk * wk)
    return np.concatenate([logits[..., :num_prefix], conv], axis=-1)


def cross_head_hallucination(logits, kernel, bias) -> np.ndarray:
    """CHH: head g of the output is ``sum_h logits[:, h] * kernel[h, g] + bias[g]`` (a 1x1 conv
    over heads), written as the explicit sum over heads."""
    logits, kernel, bias = f64(logits), f64(kernel), f64(bias)
    b, h, n, nk = logits.shape
    out = np.zeros((b, kernel.shape[1], n, nk)) + bias[None, :, None, None]
    for g in range(kernel.shape[1]):
        for i in range(h):
            out[:, g] += logits[:, i] * kernel[i, g]
    return out


# --------------------------------------------------------------------------------------------
# Norms, activations, attention, FFN.


def layer_norm(x, scale, bias, eps: float = 1e-6) -> np.ndarray:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis (biased variance)."""
    x = f64(x)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * f64(scale) + f64(bias)


def batch_norm(x, scale, bias, mean, var, eps: float = 1e-5) -> np.ndarray:
    return (f64(x) - f64(mean)) / np.sqrt(f64(var) + eps) * f64(scale) + f64(bias)


def batch_stats(x, axes) -> tuple[np.ndarray, np.ndarray]:
    """Batch mean and biased variance over ``axes`` (what train-mode BatchNorm normalizes with
    and feeds its running averages)."""
    x = f64(x)
    mean = x.mean(axis=axes)
    var = ((x - np.expand_dims(mean, axes)) ** 2).mean(axis=axes)
    return mean, var


def batch_norm_train(x, scale, bias, eps: float = 1e-5, axes=None):
    """Train-mode BatchNorm (statistics of this batch over every axis but the last by default):
    ``(out, batch mean, batch variance)``."""
    x = f64(x)
    axes = tuple(range(x.ndim - 1)) if axes is None else tuple(axes)
    mean, var = batch_stats(x, axes)
    return batch_norm(x, scale, bias, np.expand_dims(mean, axes), np.expand_dims(var, axes), eps), mean, var


def running_average(old, new, momentum: float) -> np.ndarray:
    return momentum * f64(old) + (1.0 - momentum) * f64(new)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x) -> np.ndarray:
    """Exact GELU ``x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))``."""
    x = f64(x)
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def relu(x) -> np.ndarray:
    return np.maximum(f64(x), 0.0)


def softmax(x, axis: int = -1) -> np.ndarray:
    x = f64(x)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def attention(q, k, v) -> np.ndarray:
    """``softmax(q k^T / sqrt(d)) v`` per head; q [B, N, H, d], k and v [B, M, H, d]."""
    q, k, v = f64(q), f64(k), f64(v)
    logits = np.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1])
    return np.einsum("bhnm,bmhd->bnhd", softmax(logits), v)


def ffn(x, w1, b1, w2, b2, act: Callable = gelu) -> np.ndarray:
    return act(f64(x) @ f64(w1) + f64(b1)) @ f64(w2) + f64(b2)


# --------------------------------------------------------------------------------------------
# Gradients and comparison.


def numeric_grad(f: Callable[..., np.ndarray], args: Sequence, argnums: Sequence[int], cotangent,
                 eps: float = 1e-6) -> list[np.ndarray]:
    """Central-difference gradients of ``sum(f(*args) * cotangent)`` w.r.t. ``args[i]`` for ``i``
    in ``argnums``, in float64 (error ~eps^2 times the third derivative: ~1e-10 here)."""
    args = [f64(a) for a in args]
    ct = f64(cotangent)
    grads = []
    for i in argnums:
        g = np.zeros_like(args[i])
        flat, gflat = args[i].reshape(-1), g.reshape(-1)
        for j in range(flat.size):
            keep = flat[j]
            flat[j] = keep + eps
            up = float(np.sum(f(*args) * ct))
            flat[j] = keep - eps
            down = float(np.sum(f(*args) * ct))
            flat[j] = keep
            gflat[j] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


def assert_close(got, want, rtol: float, what: str = "") -> None:
    """``max|got - want| <= rtol * max|want|`` (float32 results against float64 references:
    a tolerance relative to the array's scale, as rounding errors of sums are)."""
    got, want = f64(got), f64(want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = float(np.max(np.abs(want)))
    err = float(np.max(np.abs(got - want)))
    assert np.all(np.isfinite(got)) and err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol} x {scale:.3g}"


def conv2d_same_vjp(x, kernel, cotangent, groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Gradients ``(d/dx, d/dkernel)`` of ``sum(conv2d_same(x, kernel, groups) * cotangent)``,
    written out: each tap's contribution ``shifted(x) @ kernel[tap]`` differentiates to
    ``shifted(x)^T @ cotangent`` for the kernel and ``cotangent @ kernel[tap]^T`` added back at
    the shifted position for the input."""
    x, kernel, ct = f64(x), f64(kernel), f64(cotangent)
    b, h, w, c = x.shape
    kh, kw, cin, cout = kernel.shape
    ph, pw = kh // 2, kw // 2
    padded = np.zeros((b, h + 2 * ph, w + 2 * pw, c))
    padded[:, ph:ph + h, pw:pw + w] = x
    dpadded, dkernel = np.zeros_like(padded), np.zeros_like(kernel)
    per_group = cout // groups
    for g in range(groups):
        cs, os_ = slice(g * cin, (g + 1) * cin), slice(g * per_group, (g + 1) * per_group)
        for di in range(kh):
            for dj in range(kw):
                shifted = padded[:, di:di + h, dj:dj + w, cs].reshape(-1, cin)
                dkernel[di, dj, :, os_] = shifted.T @ ct[..., os_].reshape(-1, per_group)
                dpadded[:, di:di + h, dj:dj + w, cs] += ct[..., os_] @ kernel[di, dj, :, os_].T
    return dpadded[:, ph:ph + h, pw:pw + w], dkernel
