"""Stride-1 zero-padded convolutions rewritten for XLA CPU (same results as `lax.conv`, which
the plain layers use).

XLA's CPU convolution with `feature_group_count > 1` is slow and its backward pass very slow
(NextViT-S's MHCA conv at 14x14x384, batch 32: 7.7 s forward + backward, 0.15 s here), so:

- `depthwise_conv`: a depthwise correlation as kh*kw shifted multiply-adds, which XLA fuses
  into one loop over the map; a custom VJP keeps only the input and kernel for the backward
  pass (plain autodiff keeps kh*kw shifted copies of the map). Used by IHH (hMHSA) and PVTv2's
  FFN conv, which lay out their grids on different axes.
- `grouped_conv`: a grouped convolution as one dense convolution per group, whose forward and
  backward XLA runs as fast ordinary convolutions.

Both count the same MACs in `halluvit_jax.complexity` as the grouped `lax.conv` (the callers
put `depthwise_conv` in a named scope whose multiplies count; `grouped_conv`'s per-group convs
count themselves).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def _pad_axes(x: jax.Array, axes: tuple[int, int], ph: int, pw: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axes[0]], pad[axes[1]] = (ph, ph), (pw, pw)
    return jnp.pad(x, pad)


def _shifted_sum(padded: jax.Array, taps: jax.Array, axes: tuple[int, int], shape) -> jax.Array:
    """``sum_ij taps[i, j] * padded`` shifted by ``(i, j)`` on ``axes``, cropped to ``shape``."""
    kh, kw = taps.shape[:2]
    taps = taps.astype(padded.dtype)
    out = None
    for i in range(kh):
        for j in range(kw):
            window = [slice(None)] * padded.ndim
            window[axes[0]] = slice(i, i + shape[axes[0]])
            window[axes[1]] = slice(j, j + shape[axes[1]])
            term = taps[i, j] * padded[tuple(window)]
            out = term if out is None else out + term
    return out


def depthwise_conv(
    x: jax.Array, taps: jax.Array, axes: Sequence[int], batch_loop: bool = False
) -> jax.Array:
    """Zero-padded ('same') stride-1 depthwise cross-correlation over two axes of ``x``.

    ``out[..., y, .., x, ...] = sum_ij taps[i, j] * x[..., y + i - kh // 2, .., x + j - kw // 2, ...]``
    where ``axes = (ay, ax)`` are the grid axes of ``x`` and ``taps`` is ``[kh, kw, *s]`` with
    ``s`` of ``x``'s rank, 1 on the grid axes and on every axis the kernel is shared along
    (e.g. NHWC maps, axes ``(1, 2)``: taps ``[3, 3, 1, 1, 1, C]``). kh, kw must be odd.

    ``batch_loop=True`` computes the forward one sample at a time (``lax.map`` over axis 0, which
    must not be a grid axis and must be shared by the taps). Same values; it keeps XLA's CPU
    fusion of the nine shifted terms in one pass where the surrounding program made XLA split
    it into several materialized tensors: PVTv2-b1's stage-1 FFN conv ([32, 56, 56, 512]) in the
    full model, 15-20% of PVTv2-b1 inference and 1.2 GiB of XLA temporaries. It did not help
    IHH (it kept the maps from fusing with CHH), so it is opt-in.
    """
    axes = tuple(a % x.ndim for a in axes)
    kh, kw, *s = taps.shape
    if len(axes) != 2 or axes[0] == axes[1]:
        raise ValueError(f"depthwise_conv needs two distinct grid axes, got {axes!r}.")
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"depthwise_conv needs an odd kernel size, got {kh}x{kw}.")
    if len(s) != x.ndim or any(s[a] != 1 for a in axes) or any(
        d not in (1, n) for d, n in zip(s, x.shape)
    ):
        raise ValueError(
            f"depthwise_conv taps must be [kh, kw, *s] with s broadcastable to the input "
            f"{x.shape} and 1 on the grid axes {axes}, got {taps.shape}."
        )
    if batch_loop and (0 in axes or taps.shape[2] != 1):
        raise ValueError(
            "depthwise_conv(batch_loop=True) loops over axis 0, which must be neither a grid axis "
            f"nor a taps axis; got axes {axes} and taps {taps.shape}."
        )
    return _depthwise_conv(x, taps, axes, bool(batch_loop))


def _per_sample(x, taps, axes):
    return _shifted_sum(_pad_axes(x, axes, taps.shape[0] // 2, taps.shape[1] // 2), taps, axes, x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_conv(x, taps, axes, batch_loop):
    if not batch_loop:
        return _per_sample(x, taps, axes)
    inner = tuple(a - 1 for a in axes)
    return jax.lax.map(lambda xi: _per_sample(xi, taps[:, :, 0], inner), x)


def _depthwise_conv_fwd(x, taps, axes, batch_loop):
    return _depthwise_conv(x, taps, axes, batch_loop), (x, taps)


def _depthwise_conv_bwd(axes, batch_loop, res, g):
    del batch_loop  # the backward pass's fusions were the same either way
    x, taps = res
    x, g = jax.lax.optimization_barrier((x, g))  # recompute in the backward pass only
    kh, kw = taps.shape[:2]
    ph, pw = kh // 2, kw // 2
    dx = _shifted_sum(_pad_axes(g, axes, ph, pw), taps[::-1, ::-1], axes, x.shape)
    # Kernel gradient: dtaps[i, j] = sum over the shared axes of g * x shifted by (i, j), one tap
    # per loop iteration so that XLA materializes at most one shifted copy at a time (unrolled,
    # it kept every tap's sliced operands alive: ~1.8 GB for DeiT-S-hal, batch 32).
    padded = _pad_axes(x, axes, ph, pw)
    shared = tuple(d for d, n in enumerate(taps.shape[2:]) if n == 1)

    def tap(t, acc):
        start = [0] * x.ndim
        start[axes[0]], start[axes[1]] = t // kw, t % kw
        shifted = jax.lax.dynamic_slice(padded, start, x.shape)
        return acc.at[t].set(jnp.sum(g * shifted, axis=shared, keepdims=True, dtype=jnp.float32))

    acc = jnp.zeros((kh * kw, *taps.shape[2:]), jnp.float32)
    dtaps = jax.lax.fori_loop(0, kh * kw, tap, acc).reshape(taps.shape).astype(taps.dtype)
    return dx, dtaps


_depthwise_conv.defvjp(_depthwise_conv_fwd, _depthwise_conv_bwd)


def grouped_conv(x: jax.Array, kernel: jax.Array, groups: int) -> jax.Array:
    """``lax.conv`` NHWC/HWIO, stride 1, zero 'same' padding, ``feature_group_count=groups``.

    ``kernel`` is ``[kh, kw, C_in / groups, C_out]`` (output channels group-major, as for
    ``lax.conv`` and ``nn.Conv``). Runs as one dense convolution per group, whose forward and
    backward XLA's CPU backend runs fast (GPU and TPU run the grouped conv natively: the plain
    path).
    """
    cin, cout = x.shape[-1], kernel.shape[-1]
    kh, kw, gin = kernel.shape[:3]
    if groups < 1 or cout % groups or gin * groups != cin:
        raise ValueError(
            f"grouped_conv: {groups} groups do not split input {cin} / output {cout} channels "
            f"for a kernel {kernel.shape}; need kernel [kh, kw, C_in / groups, C_out]."
        )
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"grouped_conv needs an odd kernel size, got {kh}x{kw}.")
    conv = functools.partial(
        jax.lax.conv_general_dilated, window_strides=(1, 1),
        padding=((kh // 2, kh // 2), (kw // 2, kw // 2)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    gout = cout // groups

    outs = [conv(x[..., g * gin : (g + 1) * gin], kernel[..., g * gout : (g + 1) * gout])
            for g in range(groups)]
    return jnp.concatenate(outs, axis=-1) if groups > 1 else outs[0]
