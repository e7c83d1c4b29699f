"""hMHSA for accelerators: the same math as `halluvit_jax.layers.attention.hmhsa`, laid out for
XLA:TPU/GPU so that the hallucination never round-trips through HBM.

What XLA:TPU emits for the plain path (``real`` ``[B, N, hr, Nk]`` -> IHH as a grouped
``lax.conv`` on ``[B*N, hr, Hk, Wk]`` -> CHH einsum -> ``concatenate`` -> float32 softmax) is a
chain of fusions with a layout transpose between each: the conv wants the key grid on its
spatial dims, the einsum its own layout, and the concatenation and the float32 logits are
written to HBM. Here:

- everything is heads-major ``[B, heads, N, Nk]`` with the key axis minor (on the lanes);
- IHH's 3x3 taps are nine flat shifts of the key axis (``offset = dy * Wk + dx``, zero fill),
  each multiplied by a per-column coefficient vector that holds the tap weight where the tap
  lands inside the grid and 0 where it crosses a grid edge or a prefix column (so a row's
  wrap-around and the class token never leak in); prefix columns pass through;
- CHH is ``hr * hh`` scalar multiply-adds of whole head maps (a major-axis slice, free);
- the softmax of the real heads and of the hallucinated heads are taken separately (the
  softmax is per head row), and ``attn @ v`` runs on the matching halves of ``v``: the
  concatenation of logits or maps never exists;
- the logits matmul writes the compute dtype (as the plain path does); float32 exists only
  inside the fusion that hallucinates and normalizes.

`hmhsa_core` is the attention core on projected ``q'``, ``k'``, ``v``
(`halluvit_jax.layers.attention.hmhsa_on_core` adds the projections). ``impl="pallas"``
(`halluvit_jax.layers.kernels.hmhsa_pallas`) runs the same core as one kernel per query block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


# The 3x3 taps in PyTorch's cross-correlation order: kernel[:, ty, tx] reads key (y + ty - 1, x + tx - 1).
TAPS = tuple((ty - 1, tx - 1) for ty in range(3) for tx in range(3))


def tap_masks(nk: int, kv_grid: Sequence[int], num_prefix_tokens: int) -> np.ndarray:
    """``[9, Nk]`` float32: 1 where tap ``(dy, dx)`` of key column ``m`` lands inside the grid
    (both ``m`` and ``m + dy * Wk + dx`` grid columns of the same image), 0 elsewhere (grid edges,
    prefix columns)."""
    hk, wk = kv_grid
    p = num_prefix_tokens
    assert p + hk * wk == nk, (p, hk, wk, nk)
    masks = np.zeros((9, nk), np.float32)
    gy, gx = np.divmod(np.arange(hk * wk), wk)
    for s, (dy, dx) in enumerate(TAPS):
        masks[s, p:] = ((gy + dy >= 0) & (gy + dy < hk) & (gx + dx >= 0) & (gx + dx < wk))
    return masks


def prefix_mask(nk: int, num_prefix_tokens: int) -> np.ndarray:
    """``[Nk]`` float32: 1 on the prefix (pass-through) columns."""
    return (np.arange(nk) < num_prefix_tokens).astype(np.float32)


def tap_offsets(kv_grid: Sequence[int]) -> tuple[int, ...]:
    return tuple(dy * kv_grid[1] + dx for dy, dx in TAPS)


def flat_shift(a: jax.Array, off: int) -> jax.Array:
    """``out[..., m] = a[..., m + off]`` along the last axis, zero-filled."""
    if off == 0:
        return a
    nk = a.shape[-1]
    pad = [(0, 0)] * (a.ndim - 1)
    if off > 0:
        return jnp.pad(a[..., off:], pad + [(0, off)])
    return jnp.pad(a[..., : nk + off], pad + [(-off, 0)])


def ihh_coefficients(kernel, bias, kv_grid, num_prefix_tokens, nk):
    """Per-head, per-column IHH weights: ``coef`` ``[H, 9, Nk]`` (tap weight x `tap_masks`),
    ``add`` ``[H, Nk]`` (the bias on grid columns) and ``keep`` ``[Nk]`` (1 on prefix columns,
    which pass through), float32."""
    masks = jnp.asarray(tap_masks(nk, kv_grid, num_prefix_tokens))
    keep = jnp.asarray(prefix_mask(nk, num_prefix_tokens))
    coef = kernel.reshape(kernel.shape[0], 9, 1).astype(jnp.float32) * masks
    add = bias.astype(jnp.float32)[:, None] * (1.0 - keep)
    return coef, add, keep


def apply_ihh(maps: Sequence[jax.Array], coef, add, keep, offsets) -> list[jax.Array]:
    """IHH on a list of per-head maps ``[..., Nk]`` (float32) with `ihh_coefficients`."""
    outs = []
    for j, a in enumerate(maps):
        out = a * keep + add[j]
        for s, off in enumerate(offsets):
            out = out + coef[j, s] * flat_shift(a, off)
        outs.append(out)
    return outs


def apply_chh(maps: Sequence[jax.Array], kernel, bias) -> list[jax.Array]:
    """CHH on a list of per-head maps: ``out[g] = bias[g] + sum_h kernel[h, g] maps[h]``."""
    kernel, bias = kernel.astype(jnp.float32), bias.astype(jnp.float32)
    return [sum((maps[h] * kernel[h, g] for h in range(len(maps))), bias[g])
            for g in range(kernel.shape[1])]


def hallucinate_heads(real: Sequence[jax.Array], params, *, variant: str, kv_grid,
                      num_prefix_tokens: int) -> list[jax.Array]:
    """The hallucinated heads' logits from the real ones, as lists of per-head maps
    ``[..., Nk]`` (float32): the plain `hallucinate` rewritten as shifts and multiply-adds."""
    nk = real[0].shape[-1]
    real = list(real)

    def ihh(maps):
        coef, add, keep = ihh_coefficients(params["ihh_kernel"], params["ihh_bias"], kv_grid,
                                           num_prefix_tokens, nk)
        return apply_ihh(maps, coef, add, keep, tap_offsets(kv_grid))

    def chh(maps):
        return apply_chh(maps, params["chh_kernel"], params["chh_bias"])

    steps = {"copy": (), "ihh": (ihh,), "chh": (chh,), "ihh_chh": (ihh, chh), "chh_ihh": (chh, ihh)}
    for step in steps[variant]:
        real = step(real)
    return real


def hmhsa_core(q: jax.Array, k: jax.Array, v: jax.Array, params, *, variant: str, kv_grid,
               num_prefix_tokens: int) -> jax.Array:
    """hMHSA's attention core: ``q`` ``[B, N, hr, d]``, ``k`` ``[B, Nk, hr, d]`` (the real
    heads' q', k'), ``v`` ``[B, Nk, h, d]``, ``params`` the IHH/CHH weights the variant needs;
    returns ``[B, N, h, d]`` (real heads first), equal to the plain path's core."""
    hr, d = q.shape[2], q.shape[3]
    dtype = v.dtype
    real = jnp.einsum("bnhd,bmhd->bhnm", q * jnp.asarray(1.0 / math.sqrt(d), q.dtype), k)
    heads = [real[:, j].astype(jnp.float32) for j in range(hr)]  # [B, N, Nk] each
    hal = hallucinate_heads(heads, params, variant=variant, kv_grid=kv_grid,
                            num_prefix_tokens=num_prefix_tokens)
    attn_r = jax.nn.softmax(jnp.stack(heads, axis=1)).astype(dtype)
    attn_h = jax.nn.softmax(jnp.stack(hal, axis=1)).astype(dtype)
    out_r = jnp.einsum("bhnm,bmhd->bnhd", attn_r, v[:, :, :hr])
    out_h = jnp.einsum("bhnm,bmhd->bnhd", attn_h, v[:, :, hr:])
    return jnp.concatenate([out_r, out_h], axis=2)
