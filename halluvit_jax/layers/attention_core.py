"""``softmax(logits(q, k)) v`` whose backward pass recomputes the attention maps.

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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from halluvit_jax.layers.common import after

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


def dot_product_attention(
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
