"""Attention for CPU: ``softmax(logits(q, k)) v`` whose backward pass recomputes the maps,
and hMHSA's IHH and CHH as fused multiply-adds.

The recomputing core:

Plain autodiff keeps every block's softmaxed maps ``[B, H, N, Nk]`` (float32) from the forward
pass to the backward pass: 12 x 29 MiB for a DeiT-S train step at batch 32, more for hMHSA,
whose IHH and CHH keep their own map-sized inputs. This version keeps only q, k, v (which the
projections' backward passes need anyway), the parameters of the logits function and the
per-row log-sum-exp ``[B, H, N]``, and rebuilds the logits (and the maps) in the backward pass:
the memory schedule of flash attention, without its blocking (the maps of one block still
exist, one block at a time).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from halluvit_jax.layers.config import HAL_STEPS
from halluvit_jax.layers.fused.conv import depthwise_conv
from halluvit_jax.layers.fused.ops import after

# Named scope of the IHH body: the complexity counter counts each `mul` inside it as one MAC per
# output element (the 3x3 depthwise conv written as elementwise multiply-adds).
IHH_SCOPE = "ihh_depthwise_conv"
CHH_SCOPE = "chh_head_mixing"

# logits_fn(q, k, params) -> logits [B, H, N, Nk], for token-major q [B, N, Hq, D], k [B, Nk, Hq, D].
LogitsFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def _heads_first(t: jax.Array) -> jax.Array:
    return jnp.swapaxes(t, 1, 2)  # [B, N, H, D] <-> [B, H, N, D]


def attention_values(attn: jax.Array, v: jax.Array) -> jax.Array:
    """``attn @ v`` for maps ``[B, H, N, Nk]`` and ``v`` ``[B, Nk, H, D]``, as ``[B, N, H, D]``.

    The matmul writes heads-first and is transposed afterwards: asking XLA for a token-major
    output directly made the CPU dot ~2.3x slower at DeiT-S shapes.
    """
    return _heads_first(jnp.einsum("bhnm,bhmd->bhnd", attn, _heads_first(v)))


def scaled_logits(q: jax.Array, k: jax.Array, params: Any = ()) -> jax.Array:
    """``q k^T / sqrt(d)`` for token-major ``[B, N, H, D]`` inputs, as ``[B, H, N, Nk]``.

    The matmul runs heads-first (``bhnd,bhmd``), the layout XLA's CPU dot runs fastest. ``params``
    is unused: the signature of a `LogitsFn`.
    """
    del params
    qh = _heads_first(q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype))
    return jnp.einsum("bhnd,bhmd->bhnm", qh, _heads_first(k))


def recomputing_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    params: Any = (),
    logits_fn: LogitsFn = scaled_logits,
) -> jax.Array:
    """Attention of ``q`` ``[B, N, Hq, D]`` over ``k`` ``[B, Nk, Hq, D]``, ``v`` ``[B, Nk, H, Dv]``,
    returning ``[B, N, H, Dv]``, with maps ``softmax(logits_fn(q, k, params))`` (softmax in
    float32 whatever the compute dtype).

    ``logits_fn`` (static, hashable) turns q and k into ``[B, H, N, Nk]`` logits: by default
    `scaled_logits`; hMHSA passes its real-logits -> IHH/CHH function with its IHH/CHH kernels
    as ``params``, which get gradients. Same values as the plain composition; only the backward
    pass's memory differs (see the module docstring).
    """
    return _attention(q, k, v, params, logits_fn)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, params, logits_fn):
    return _attention_fwd(q, k, v, params, logits_fn)[0]


def _f32_logits(logits_fn, q, k, params):
    return logits_fn(q, k, params).astype(jnp.float32)


def _attention_fwd(q, k, v, params, logits_fn):
    logits = _f32_logits(logits_fn, q, k, params)
    # One exp pass over the maps (the log-sum-exp kept for the backward pass comes from the
    # same row max and sum; the primal drops it).
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - row_max)
    row_sum = jnp.sum(e, axis=-1, keepdims=True)
    probs = (e / row_sum).astype(v.dtype)
    lse = row_max + jnp.log(row_sum)
    return attention_values(probs, v), (q, k, v, params, lse)


def _attention_bwd(logits_fn, res, g):
    q, k, v, params, lse = res
    q = after(q, g)  # rebuild the maps in the backward pass, not in the forward
    logits, logits_vjp = jax.vjp(functools.partial(_f32_logits, logits_fn), q, k, params)
    probs = jnp.exp(logits - lse)
    gh, vh = _heads_first(g), _heads_first(v)
    dv = _heads_first(jnp.einsum("bhnm,bhnd->bhmd", probs.astype(g.dtype), gh))
    dprobs = jnp.einsum("bhnd,bhmd->bhnm", gh, vh).astype(jnp.float32)
    dlogits = probs * (dprobs - jnp.sum(dprobs * probs, axis=-1, keepdims=True))
    dq, dk, dparams = logits_vjp(dlogits)
    return dq, dk, dv, dparams


_attention.defvjp(_attention_fwd, _attention_bwd)


def intra_head_hallucination(
    logits: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    kv_grid: Sequence[int],
    num_prefix_tokens: int,
) -> jax.Array:
    """IHH: per-head 3x3 depthwise convolution over the key grid of every query row.

    `logits` `[B, H, N, Nk]`, `kernel` `[H, 3, 3]` (cross-correlation, PyTorch orientation),
    `bias` `[H]`. Zero padding, stride 1. Prefix key columns pass through unchanged. Written as
    nine shifted multiply-adds, which XLA fuses into a single loop over the logits (much faster
    on CPU than `lax.conv` with feature groups). The body runs in the named scope
    `IHH_SCOPE` so that `halluvit_jax.complexity` can count its multiplies as conv MACs; the
    scope is metadata only and does not change the computation.
    """
    with jax.named_scope(IHH_SCOPE):
        return _intra_head_hallucination(logits, kernel, bias, kv_grid, num_prefix_tokens)


def _intra_head_hallucination(logits, kernel, bias, kv_grid, num_prefix_tokens):
    b, h, n, _ = logits.shape
    hk, wk = kv_grid
    prefix, grid = logits[..., :num_prefix_tokens], logits[..., num_prefix_tokens:]
    # Depthwise over heads, shared over batch and query rows: taps [kh, kw, 1, H, 1, 1, 1].
    taps = jnp.transpose(kernel, (1, 2, 0))[:, :, None, :, None, None, None]
    out = depthwise_conv(grid.reshape(b, h, n, hk, wk), taps.astype(logits.dtype), (3, 4))
    out = out + bias.astype(logits.dtype)[None, :, None, None, None]
    out = out.reshape(b, h, n, hk * wk)
    if num_prefix_tokens:
        out = jnp.concatenate([prefix, out], axis=-1)
    return out


def cross_head_hallucination(logits: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """CHH: a 1x1 convolution across the head axis, `[B, Hin, N, Nk] -> [B, Hout, N, Nk]`.

    Written as `Hin * Hout` scalar multiply-adds of whole maps (heads are few), which XLA fuses
    with IHH and the concatenation into one pass over the logits: ~5x faster on CPU than the
    einsum, whose dot cannot fuse. Runs in the named scope `CHH_SCOPE`, whose multiplies
    `halluvit_jax.complexity` counts as MACs (the same count as the einsum).
    """
    with jax.named_scope(CHH_SCOPE):
        return _cross_head_hallucination(logits, kernel, bias)


def _mix_heads(maps: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """``out[:, g] = bias[g] + sum_h maps[:, h] * kernel[h, g]`` as scalar multiply-adds."""
    outs = []
    for g in range(kernel.shape[1]):
        out = 0 if bias is None else bias[g]
        for h in range(kernel.shape[0]):
            out = out + maps[:, h] * kernel[h, g]
        outs.append(out)
    return jnp.stack(outs, axis=1)


@jax.custom_vjp
def _cross_head_hallucination(logits, kernel, bias):
    return _mix_heads(logits, kernel.astype(logits.dtype), bias.astype(logits.dtype))


def _chh_fwd(logits, kernel, bias):
    return _cross_head_hallucination(logits, kernel, bias), (logits, kernel)


def _chh_bwd(res, g):
    # By hand, with the same multiply-adds transposed: autodiff turns each read of one head
    # (``logits[:, h]``) into a zero-padded map-sized gradient that is then summed.
    logits, kernel = res
    dlogits = _mix_heads(g, kernel.T.astype(g.dtype), None)
    red = (0, 2, 3)
    dkernel = jnp.stack(
        [jnp.stack([jnp.sum(logits[:, h] * g[:, o], axis=(0, 1, 2)) for o in range(g.shape[1])])
         for h in range(logits.shape[1])]
    )
    dbias = jnp.sum(g, axis=red)
    return dlogits, dkernel.astype(kernel.dtype), dbias.astype(kernel.dtype)


_cross_head_hallucination.defvjp(_chh_fwd, _chh_bwd)


def hal_logits(
    q: jax.Array,
    k: jax.Array,
    params: dict[str, jax.Array],
    *,
    variant: str,
    kv_grid: tuple[int, int] | None,
    num_prefix_tokens: int,
) -> jax.Array:
    """hMHSA's logits ``[B, 2 hr, N, Nk]``: the real heads' ``q k^T / sqrt(d)`` (``q``, ``k``
    token-major ``[B, N, hr, D]``), then the hallucinated heads from them per ``variant``,
    concatenated after the real ones. ``params`` holds ``ihh_kernel``/``ihh_bias`` and/or
    ``chh_kernel``/``chh_bias`` as the variant needs (`HalAttention`'s params).
    """
    real = scaled_logits(q, k)

    def ihh(a):
        return intra_head_hallucination(a, params["ihh_kernel"], params["ihh_bias"], kv_grid,
                                        num_prefix_tokens)

    def chh(a):
        return cross_head_hallucination(a, params["chh_kernel"], params["chh_bias"])

    hal = real
    for step in HAL_STEPS[variant]:
        hal = {"ihh": ihh, "chh": chh}[step](hal)
    return jnp.concatenate([real, hal], axis=1)
