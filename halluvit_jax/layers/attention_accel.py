"""hMHSA for accelerators: the same math as `halluvit_jax.layers.attention.hmhsa`, laid out for
XLA:TPU/GPU so that the hallucination adds no pass over the attention maps.

The hallucination is affine in the logits and acts along the key axis only, and the real logits
are ``q'_h . k'_h``; so it can be moved onto the keys. For IHH (a 3x3 convolution over the key
grid, per head):

    IHH_h(q'_h k'_h^T)[n, m] = q'_h[n] . T_h(k'_h)[m] + bias_h[m],
    T_h(k)[m] = sum_taps w_h[tap] k[m + tap]   (the same 3x3 convolution, on the keys' grid)

and CHH (a 1x1 convolution across heads) mixes whole head maps. `hmhsa_core` therefore computes:

- the real logits ``q'_h k'_h^T`` and, for IHH, ``q'_h T_h(k'_h)^T``: two matmuls the shape of
  MHSA's, heads-major ``[B, heads, N, Nk]`` with the key axis minor (IHH costs a depthwise 3x3
  convolution of the ``[B, Hk, Wk, C/2]`` keys instead of nine passes over ``N x Nk`` maps);
- CHH as ``hr * hr`` scalar multiply-adds of those maps, plus the constant part of the
  hallucination (``bias``: the hallucination of an all-zero map, ``[hr, Nk]``, in which IHH's
  bias, CHH's bias and the zero padding at the grid's edges live);
- ``chh_ihh`` (IHH after CHH) as one matmul per hallucinated head against
  ``T_g(sum_h chh[h, g] k'_h)`` laid out ``[B, Nk, hr, d, hr]`` (a grouped convolution);
- the real and the hallucinated heads' softmaxes separately (it is per head row), and
  ``attn @ v`` on the matching halves of ``v``: no concatenation of logits or maps.

For the ONNX export (`halluvit_jax.layers.config.trace_target`) the core is laid out for
onnxruntime instead (`_core_for_onnx`): keys transposed once and convolved channels first, CHH as
one ``[hr, hr] x [B, hr, N*Nk]`` matmul (`mix_heads`), and with one real head a single attention
over the real and hallucinated keys joined, its output written with the heads side by side.

The logits matmuls write the compute dtype, as MHSA's do; the hallucinated logits are rounded to
it too (float32 exists only inside the fusions), so in bfloat16 they carry the rounding the real
logits already carry. The logit FLOPs are MHSA's (every head a ``d``-wide dot) rather than half
of them; XLA:TPU's estimate of HBM bytes for the core is the reason (benchmarks/
attention_core_tpu.py, docs/aot.md).

`hmhsa_core` is the attention core on projected ``q'``, ``k'``, ``v``
(`halluvit_jax.layers.attention.hmhsa_on_core` adds the projections). ``impl="pallas"``
(`halluvit_jax.layers.kernels.hmhsa_pallas`) runs the same core as one kernel per query block,
with IHH applied to the logits by rolls and the per-column weights of `ihh_coefficients`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from halluvit_jax.layers.common import grouped_conv3x3
from halluvit_jax.layers.config import tracing_for


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


def _grid_conv(k: jax.Array, taps: jax.Array, kv_grid, num_prefix_tokens: int, prefix):
    """A grouped 3x3 convolution of the grid keys ``k[:, p:]`` (``[B, Hk*Wk, ...]``, channels
    flattened) with ``taps`` ``[3, 3, 1, C_out]`` (PyTorch's cross-correlation order, zero
    padding), one group per input channel; the prefix keys become ``prefix`` (passed through).
    On a mesh with a ``model`` axis, its kernel gradient avoids XLA's partitioning bug
    (`halluvit_jax.layers.common.grouped_conv3x3`)."""
    b, p = k.shape[0], num_prefix_tokens
    hk, wk = kv_grid
    grid = k[:, p:].reshape(b, hk, wk, -1)
    out = grouped_conv3x3(grid, taps, grid.shape[-1], jnp.float32)
    out = out.astype(k.dtype).reshape(b, hk * wk, *prefix.shape[2:])
    return jnp.concatenate([prefix, out], axis=1) if p else out


def ihh_keys(k: jax.Array, kernel: jax.Array, kv_grid, num_prefix_tokens: int) -> jax.Array:
    """``T_h(k'_h)``: ``k`` ``[B, Nk, hr, d]`` convolved over the key grid with head ``h``'s IHH
    kernel (``[hr, 3, 3]``) on each of its ``d`` channels; prefix keys pass through."""
    hr, d = k.shape[2], k.shape[3]
    taps = jnp.broadcast_to(kernel.astype(jnp.float32).transpose(1, 2, 0)[:, :, :, None], (3, 3, hr, d))
    return _grid_conv(k, taps.reshape(3, 3, 1, hr * d), kv_grid, num_prefix_tokens,
                      k[:, :num_prefix_tokens])


def chh_ihh_keys(k: jax.Array, ihh_kernel, chh_kernel, kv_grid, num_prefix_tokens: int) -> jax.Array:
    """``[B, Nk, hr, d, hr]``: entry ``[..., h, :, g]`` is ``T_g(chh[h, g] k'_h)``, so that
    hallucinated head ``g`` of ``chh_ihh`` is ``sum_h q'_h . (that)`` (plus `hal_bias`)."""
    hr, d = k.shape[2], k.shape[3]
    w = chh_kernel.astype(jnp.float32)  # [h, g]
    taps = ihh_kernel.astype(jnp.float32).transpose(1, 2, 0)[:, :, None, None, :] * w[:, None, :]
    taps = jnp.broadcast_to(taps, (3, 3, hr, d, hr)).reshape(3, 3, 1, hr * d * hr)
    p = num_prefix_tokens
    prefix = (k[:, :p, :, :, None].astype(jnp.float32) * w[:, None, :]).astype(k.dtype)
    return _grid_conv(k, taps, kv_grid, p, prefix)


def mix_heads(x: jax.Array, w: jax.Array) -> jax.Array:
    """CHH's head mixing of ``x`` ``[B, hr, N, Nk]`` by ``w`` ``[hr, hr]``:
    ``out[:, g] = sum_h w[h, g] x[:, h]``. For XLA ``hr * hr`` multiply-adds of whole head maps,
    which it fuses with the bias and the softmax into one pass over the maps; for ONNX
    (`trace_target`) one ``[hr, hr] x [B, hr, N*Nk]`` matmul, as onnxruntime runs every
    elementwise op as its own pass."""
    hr = w.shape[0]
    if tracing_for("onnx"):
        b, _, n, nk = x.shape
        return jnp.matmul(w.T, x.reshape(b, hr, n * nk)).reshape(b, w.shape[1], n, nk)
    xs = [x[:, h] for h in range(hr)]
    return jnp.stack([sum(xs[h] * w[h, g] for h in range(hr)) for g in range(w.shape[1])], axis=1)


def hal_bias(params, *, variant: str, kv_grid, num_prefix_tokens: int, hr: int, nk: int) -> jax.Array:
    """``[hr, Nk]`` float32: the hallucination of an all-zero logit map (its constant part)."""
    zeros = [jnp.zeros((nk,), jnp.float32)] * hr
    return jnp.stack(hallucinate_heads(zeros, params, variant=variant, kv_grid=kv_grid,
                                       num_prefix_tokens=num_prefix_tokens))


def hmhsa_core(q: jax.Array, k: jax.Array, v: jax.Array, params, *, variant: str, kv_grid,
               num_prefix_tokens: int) -> jax.Array:
    """hMHSA's attention core: ``q`` ``[B, N, hr, d]``, ``k`` ``[B, Nk, hr, d]`` (the real
    heads' q', k'), ``v`` ``[B, Nk, h, d]``, ``params`` the IHH/CHH weights the variant needs;
    returns ``[B, N, h, d]`` (real heads first), equal to the plain path's core."""
    hr, d = q.shape[2], q.shape[3]
    nk = k.shape[1]
    static = dict(kv_grid=kv_grid, num_prefix_tokens=num_prefix_tokens)
    qs = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    if variant in ("ihh", "chh", "ihh_chh") and tracing_for("onnx"):
        return _core_for_onnx(qs, k, v, params, variant=variant, **static)
    bias = hal_bias(params, variant=variant, hr=hr, nk=nk, **static)[None, :, None, :]
    real = jnp.einsum("bnhd,bmhd->bhnm", qs, k)  # [B, hr, N, Nk], the compute dtype
    if variant == "copy":
        hal = real
    elif variant == "chh_ihh":
        keys = chh_ihh_keys(k, params["ihh_kernel"], params["chh_kernel"], **static)
        hal = (jnp.einsum("bnhd,bmhdg->bgnm", qs, keys) + bias).astype(real.dtype)
    else:
        mix = "chh" in variant
        x = real
        if "ihh" in variant:
            keys = ihh_keys(k, params["ihh_kernel"], **static)
            x = jnp.einsum("bnhd,bmhd->bhnm", qs, keys)
        if mix:
            x = mix_heads(x.astype(jnp.float32), params["chh_kernel"].astype(jnp.float32))
        hal = (x + bias).astype(real.dtype)
    return attend_halves(real, hal, v)


def _core_for_onnx(qs, k, v, params, *, variant: str, kv_grid, num_prefix_tokens: int):
    """`hmhsa_core` (``variant`` ``ihh``, ``chh`` or ``ihh_chh``; ``qs`` already scaled) as the
    ONNX export traces it (`halluvit_jax.layers.config.trace_target`), for onnxruntime, which runs
    every op as its own pass over memory:

    - the keys are transposed once, to ``[B, hr, d, Nk]``: both logits matmuls read them in that
      layout, and IHH convolves their grid columns there, channels first (``[B, hr*d, Hk, Wk]``,
      the layout of onnxruntime's Conv), with no transpose around the convolution;
    - with one real head, CHH's 1x1 mix is a scale, applied to the keys; then the real and the
      hallucinated keys are joined along the key axis (``[B, d, 2 Nk]``, a few KB), so that one
      matmul writes both heads' logits as ``[B, N, 2, Nk]``, one softmax normalizes them, and one
      matmul against ``v`` laid out block-diagonally (``[B, 2 Nk, 2 d]``, zeros off the heads'
      blocks) writes the output as ``[B, N, 2 d]``: twice the MACs of that matmul, and no
      transpose of the output, no split of ``v``, no join (in PVTv2-b1's first stage a pass
      over ``[B, 3136, 64]`` per layer);
    - otherwise CHH is one ``[hr, hr]`` matmul over the hallucinated maps (`mix_heads`), and
      ``v`` is transposed once and split per half along its head axis;
    - without prefix keys the hallucination's constant part is the same in every key column of a
      head (IHH's bias on every grid column, CHH's everywhere): the softmax does not see it, and
      no pass over the maps adds it.
    """
    b, n, hr, d = qs.shape
    nk, p = k.shape[1], num_prefix_tokens
    bias = hal_bias(params, variant=variant, kv_grid=kv_grid, num_prefix_tokens=p, hr=hr,
                    nk=nk)[None, :, None, :] if p else None
    k_t = jnp.transpose(k, (0, 2, 3, 1))  # [B, hr, d, Nk]
    keys = k_t
    if "ihh" in variant:
        hk, wk = kv_grid
        flat = k_t.reshape(b, hr * d, nk)
        taps = jnp.repeat(params["ihh_kernel"].astype(k.dtype), d, axis=0)[:, None]  # [hr*d, 1, 3, 3]
        grid = lax.conv_general_dilated(flat[..., p:].reshape(b, hr * d, hk, wk), taps, (1, 1), "SAME",
                                        dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                        feature_group_count=hr * d).reshape(b, hr * d, hk * wk)
        keys = (jnp.concatenate([flat[..., :p], grid], axis=-1) if p else grid).reshape(b, hr, d, nk)
    mix = "chh" in variant
    if hr == 1:
        if mix:  # CHH of one head is a scale: of the keys, not the maps
            keys = keys * params["chh_kernel"][0, 0].astype(keys.dtype)
        joined = jnp.concatenate([k_t, keys], axis=-1).reshape(b, d, 2 * nk)  # real | hallucinated
        logits = jnp.matmul(qs.reshape(b, n, d), joined).reshape(b, n, 2, nk)
        if p:  # bias [1, 1, 1, Nk]: none on the real head
            logits = logits + jnp.concatenate([jnp.zeros_like(bias), bias], axis=2).astype(logits.dtype)
        attn = jax.nn.softmax(logits.astype(jnp.float32)).astype(v.dtype).reshape(b, n, 2 * nk)
        blocks = jnp.repeat(jnp.eye(2, dtype=v.dtype), d, axis=1)[:, None, :]  # [2, 1, 2d]
        v_blocks = (v.reshape(b, 1, nk, 2 * d) * blocks).reshape(b, 2 * nk, 2 * d)
        return jnp.matmul(attn, v_blocks).reshape(b, n, 2, d)
    q_t = jnp.transpose(qs, (0, 2, 1, 3))  # [B, hr, N, d]
    real = jnp.matmul(q_t, k_t)
    x = jnp.matmul(q_t, keys) if "ihh" in variant else real
    if mix:
        x = mix_heads(x.astype(jnp.float32), params["chh_kernel"].astype(jnp.float32))
    hal = (x + bias if p else x).astype(real.dtype)
    v_t = jnp.transpose(v, (0, 2, 1, 3))  # [B, h, Nk, d]
    outs = [jnp.matmul(jax.nn.softmax(a.astype(jnp.float32)).astype(v.dtype), v_t[:, j * hr:(j + 1) * hr])
            for j, a in enumerate((real, hal))]
    return jnp.transpose(jnp.concatenate(outs, axis=1), (0, 2, 1, 3))


def attend_halves(real: jax.Array, hal: jax.Array, v: jax.Array) -> jax.Array:
    """The real and the hallucinated heads' logits (``[B, hr, N, Nk]`` each) softmaxed apart
    (float32 inside) and applied to the matching halves of ``v`` ``[B, Nk, h, d]``:
    ``[B, N, h, d]``, real heads first, with no concatenation of logits or maps."""
    hr, dtype = real.shape[1], v.dtype
    attn_r = jax.nn.softmax(real.astype(jnp.float32)).astype(dtype)
    attn_h = jax.nn.softmax(hal.astype(jnp.float32)).astype(dtype)
    out_r = jnp.einsum("bhnm,bmhd->bnhd", attn_r, v[:, :, :hr])
    out_h = jnp.einsum("bhnm,bmhd->bnhd", attn_h, v[:, :, hr:])
    return jnp.concatenate([out_r, out_h], axis=2)
