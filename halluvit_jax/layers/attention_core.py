"""``softmax(q k^T / sqrt(d)) v`` whose backward pass recomputes the attention maps.

Plain autodiff keeps every block's softmaxed maps ``[B, H, N, Nk]`` (float32) from the forward
pass to the backward pass: 12 x 29 MiB for a DeiT-S train step at batch 32. This version keeps
only q, k, v (which the projections' backward passes need anyway) and the per-row log-sum-exp
``[B, H, N]``, and rebuilds the maps in the backward pass with one more ``q k^T``: the
memory schedule of flash attention, without its blocking (the maps of one block still exist,
one block at a time).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from halluvit_jax.layers.common import after


def _heads_first(t: jax.Array) -> jax.Array:
    return jnp.swapaxes(t, 1, 2)  # [B, N, H, D] <-> [B, H, N, D]


def _logits(qh: jax.Array, kh: jax.Array) -> jax.Array:
    """``q k^T / sqrt(d)`` for heads-first ``[B, H, N, D]`` inputs, float32 ``[B, H, N, Nk]``."""
    qh = qh * jnp.asarray(qh.shape[-1] ** -0.5, qh.dtype)
    return jnp.einsum("bhnd,bhmd->bhnm", qh, kh).astype(jnp.float32)


@jax.custom_vjp
def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Scaled dot-product attention of ``q`` ``[B, N, H, D]`` over ``k``, ``v`` ``[B, Nk, H, D]``,
    returning ``[B, N, H, D]``; softmax in float32 whatever the compute dtype.

    Same values as ``_attention_values(softmax(_attention_logits(q, k)), v)`` in
    :mod:`halluvit_jax.layers.attention`; only the backward pass's memory differs (see the
    module docstring). Matmuls are heads-first, the layout XLA's CPU dot runs fastest.
    """
    return _attention_fwd(q, k, v)[0]


def _attention_fwd(q, k, v):
    qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)
    logits = _logits(qh, kh)
    # One exp pass over the maps (the log-sum-exp kept for the backward pass comes from the
    # same row max and sum; the primal drops it).
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - row_max)
    row_sum = jnp.sum(e, axis=-1, keepdims=True)
    probs = (e / row_sum).astype(v.dtype)
    lse = row_max + jnp.log(row_sum)
    out = _heads_first(jnp.einsum("bhnm,bhmd->bhnd", probs, vh))
    return out, (q, k, v, lse)


def _attention_bwd(res, g):
    q, k, v, lse = res
    q = after(q, g)  # rebuild the maps in the backward pass, not in the forward
    qh, kh, vh, gh = _heads_first(q), _heads_first(k), _heads_first(v), _heads_first(g)
    probs = jnp.exp(_logits(qh, kh) - lse)
    dv = jnp.einsum("bhnm,bhnd->bhmd", probs.astype(g.dtype), gh)
    dprobs = jnp.einsum("bhnd,bhmd->bhnm", gh, vh).astype(jnp.float32)
    dlogits = probs * (dprobs - jnp.sum(dprobs * probs, axis=-1, keepdims=True))
    dlogits = (dlogits * (q.shape[-1] ** -0.5)).astype(q.dtype)
    dq = jnp.einsum("bhnm,bhmd->bhnd", dlogits, kh)
    dk = jnp.einsum("bhnm,bhnd->bhmd", dlogits, qh)
    return _heads_first(dq), _heads_first(dk), _heads_first(dv)


dot_product_attention.defvjp(_attention_fwd, _attention_bwd)
