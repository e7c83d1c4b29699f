"""Multi-head self-attention and hMHSA (hallucinated multi-head self-attention).

Both modules share one call signature so that a backbone can swap one for the other::

    y = attn(x, kv, kv_grid=(Hk, Wk), num_prefix_tokens=P, train=train)

- `x`: query tokens `[B, N, C]`, or a `PreNorm` (the block's LayerNorm, deferred so that it is
  fused into the qkv projection: `LayerNorm(defer=True)`).
- `kv`: optional reduced key/value tokens `[B, Nk, C]` (PVTv2 SRA, NextViT E-MHSA). When it is
  None the keys are `x` itself and q, k, v come from one fused projection `qkv`; otherwise `q`
  is computed from `x` and `kv` (k and v fused) from `kv`.
- `kv_grid`: the `(Hk, Wk)` grid the non-prefix keys lie on. hMHSA needs it (its intra-head
  hallucination is a 3x3 convolution over the key grid); the caller must pass it, we never
  guess it from `sqrt(Nk)`. Plain attention only checks it when given.
- `num_prefix_tokens`: leading non-grid key tokens (the class token of DeiT), passed through
  the intra-head hallucination unchanged.

Softmaxed attention maps `[B, heads, N, Nk]` are sown into the 'intermediates' collection as
`attn` (real heads first, then hallucinated ones), so analysis tools read them with
`model.apply(..., mutable=['intermediates'])` without changing the forward.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from halluvit_jax.layers.attention_core import (
    LogitsFn,
    attention_values,
    dot_product_attention,
    scaled_logits,
)
from halluvit_jax.layers.common import (
    Dtype,
    Initializer,
    PreNorm,
    SplitDense,
    materialize,
    softmax,
    timm_trunc_normal,
)
from halluvit_jax.layers.conv import depthwise_conv

HAL_VARIANTS = ("copy", "ihh", "chh", "ihh_chh", "chh_ihh")
# Named scope of the IHH body: the complexity counter counts each `mul` inside it as one MAC per
# output element (the 3x3 depthwise conv written as elementwise multiply-adds).
IHH_SCOPE = "ihh_depthwise_conv"
CHH_SCOPE = "chh_head_mixing"


def _check_grid(num_keys: int, kv_grid: Sequence[int] | None, num_prefix_tokens: int, required: bool):
    if kv_grid is None:
        if required:
            raise ValueError(
                "HalAttention needs the key grid: pass kv_grid=(Hk, Wk) so that "
                "num_prefix_tokens + Hk * Wk equals the number of key tokens."
            )
        return
    if len(kv_grid) != 2:
        raise ValueError(f"kv_grid must be a pair (Hk, Wk), got {kv_grid!r}.")
    hk, wk = kv_grid
    if num_prefix_tokens + hk * wk != num_keys:
        raise ValueError(
            f"Key grid {hk}x{wk} with {num_prefix_tokens} prefix token(s) describes "
            f"{num_prefix_tokens + hk * wk} keys, but the input has {num_keys}; pass the grid "
            "of the key tokens (after any spatial reduction) as kv_grid."
        )


def _softmax_f32(logits: jax.Array, dtype: Dtype) -> jax.Array:
    """Softmax over keys in float32 (stable under bfloat16 compute), cast back to `dtype`."""
    return softmax(logits.astype(jnp.float32)).astype(dtype)


def _attend(module: nn.Module, q, k, v, params, logits_fn: LogitsFn, attn_drop: float,
            train: bool) -> jax.Array:
    """``softmax(logits_fn(q, k, params)) v`` for an attention module, ``[B, N, H, D]``.

    When the maps are needed as values (sown into a mutable 'intermediates' collection for
    analysis, or dropped out in training) they are built explicitly; otherwise the op goes
    through `dot_product_attention`, which gives the same values and gradients but rebuilds the
    maps in the backward pass instead of keeping them.
    """
    if module.is_mutable_collection("intermediates") or (train and attn_drop > 0):
        attn = _softmax_f32(logits_fn(q, k, params), v.dtype)
        module.sow("intermediates", "attn", attn)
        attn = nn.Dropout(attn_drop)(attn, deterministic=not train)
        return attention_values(attn, v)
    return dot_product_attention(q, k, v, params, logits_fn)


class Attention(nn.Module):
    """Standard multi-head self-attention (timm `Attention`), optionally on reduced keys."""

    dim: int
    num_heads: int
    qkv_bias: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    kernel_init: Initializer = timm_trunc_normal
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def _dense(self, features: int, name: str, use_bias: bool = True) -> nn.Dense:
        return nn.Dense(
            features,
            use_bias=use_bias,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _split_dense(self, splits: tuple[int, ...], name: str) -> SplitDense:
        """The fused projection `name` (one kernel, timm's layout), returned split per group."""
        return SplitDense(
            splits, use_bias=self.qkv_bias, kernel_init=self.kernel_init, dtype=self.dtype,
            param_dtype=self.param_dtype, name=name,
        )

    @nn.compact
    def __call__(
        self,
        x: jax.Array | PreNorm,
        kv: jax.Array | None = None,
        *,
        kv_grid: Sequence[int] | None = None,
        num_prefix_tokens: int = 0,
        train: bool = False,
    ) -> jax.Array:
        b, n, c = x.shape
        if c != self.dim or self.dim % self.num_heads:
            raise ValueError(
                f"Attention(dim={self.dim}, num_heads={self.num_heads}) got {c} channels; dim "
                "must equal the input channels and be divisible by num_heads."
            )
        h, d = self.num_heads, self.dim // self.num_heads
        if kv is None:
            q, k, v = self._split_dense((c, c, c), "qkv")(x)
        else:
            q = self._dense(c, "q", self.qkv_bias)(materialize(x))
            k, v = self._split_dense((c, c), "kv")(kv)
        q, k, v = (t.reshape(b, t.shape[1], h, d) for t in (q, k, v))
        _check_grid(k.shape[1], kv_grid, num_prefix_tokens, required=False)

        out = _attend(self, q, k, v, (), scaled_logits, self.attn_drop, train).reshape(b, n, c)
        out = self._dense(c, "proj")(out)
        return nn.Dropout(self.proj_drop)(out, deterministic=not train)


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


def _identity_dw_init(key, shape, dtype=jnp.float32):
    """IHH kernel starting as the identity: centre tap 1, all others 0."""
    del key
    heads, kh, kw = shape
    return jnp.zeros(shape, dtype).at[:, kh // 2, kw // 2].set(1.0)


def _identity_mix_init(key, shape, dtype=jnp.float32):
    """CHH kernel starting as the identity map from real head i to hallucinated head i."""
    del key
    return jnp.eye(*shape, dtype=dtype)


def _torch_conv_uniform(fan_in: int):
    """PyTorch's default Conv2d init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


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

    hal = {"copy": lambda a: a, "ihh": ihh, "chh": chh, "ihh_chh": lambda a: chh(ihh(a)),
           "chh_ihh": lambda a: ihh(chh(a))}[variant](real)
    return jnp.concatenate([real, hal], axis=1)


class HalAttention(nn.Module):
    """hMHSA (DESIGN.md section 2): half the heads computed, half hallucinated from them.

    q' and k' have `C/2` channels (`num_heads / 2` real heads of size `C / num_heads`); v keeps
    all `C` channels. The real logits feed IHH and/or CHH (per `variant`) to produce the
    hallucinated logits; real and hallucinated logits are concatenated along heads, softmaxed,
    and applied to v.

    Parameters: fused `qkv` (`C -> 2C`: q' | k' | v, head-major) when keys are the input, else
    `q` (`C -> C/2`) and `kv` (`C -> C/2 + C`); `ihh_kernel` `[hr, 3, 3]`, `ihh_bias` `[hr]`;
    `chh_kernel` `[hr, hh]`, `chh_bias` `[hh]`; `proj`.

    `hal_init`: "identity" (default) starts IHH and CHH as identities, so the hallucinated heads
    begin as copies of the real ones and training moves them apart; "random" uses PyTorch's
    default conv init. Note: biases added uniformly over all key columns are invisible to the
    softmax, so `chh_bias` (and `ihh_bias` without prefix tokens) only matter where a later
    zero-padded IHH makes them position-dependent (variant "chh_ihh").
    """

    dim: int
    num_heads: int
    variant: str = "ihh_chh"
    qkv_bias: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    ihh_kernel_size: int = 3
    hal_init: str = "identity"
    kernel_init: Initializer = timm_trunc_normal
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def _dense(self, features: int, name: str, use_bias: bool = True) -> nn.Dense:
        return nn.Dense(
            features,
            use_bias=use_bias,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _split_dense(self, splits: tuple[int, ...], name: str) -> SplitDense:
        """The fused projection `name` (one kernel, timm's layout), returned split per group."""
        return SplitDense(
            splits, use_bias=self.qkv_bias, kernel_init=self.kernel_init, dtype=self.dtype,
            param_dtype=self.param_dtype, name=name,
        )

    def _validate(self, c: int) -> None:
        if self.variant not in HAL_VARIANTS:
            raise ValueError(f"Unknown hMHSA variant {self.variant!r}; choose one of {HAL_VARIANTS}.")
        if self.num_heads % 2:
            raise ValueError(
                f"hMHSA needs an even head count (half real, half hallucinated), got "
                f"num_heads={self.num_heads}; use the nearest even count that divides dim={self.dim}."
            )
        if c != self.dim or self.dim % self.num_heads:
            raise ValueError(
                f"HalAttention(dim={self.dim}, num_heads={self.num_heads}) got {c} channels; dim "
                "must equal the input channels and be divisible by num_heads."
            )
        if self.hal_init not in ("identity", "random"):
            raise ValueError(f"hal_init must be 'identity' or 'random', got {self.hal_init!r}.")

    @nn.compact
    def __call__(
        self,
        x: jax.Array | PreNorm,
        kv: jax.Array | None = None,
        *,
        kv_grid: Sequence[int] | None = None,
        num_prefix_tokens: int = 0,
        train: bool = False,
    ) -> jax.Array:
        b, n, c = x.shape
        self._validate(c)
        h = self.num_heads
        hr = hh = h // 2
        d = c // h
        half = hr * d
        if kv is None:
            q, k, v = self._split_dense((half, half, c), "qkv")(x)
            nk = n
        else:
            q = self._dense(half, "q", self.qkv_bias)(materialize(x))
            k, v = self._split_dense((half, c), "kv")(kv)
            nk = kv.shape[1]
        _check_grid(nk, kv_grid, num_prefix_tokens, required="ihh" in self.variant)
        q = q.reshape(b, n, hr, d)
        k = k.reshape(b, nk, hr, d)
        v = v.reshape(b, nk, h, d)

        ks = self.ihh_kernel_size
        if self.hal_init == "identity":
            ihh_init, chh_init = _identity_dw_init, _identity_mix_init
        else:
            ihh_init, chh_init = _torch_conv_uniform(ks * ks), _torch_conv_uniform(hr)
        zeros = nn.initializers.zeros
        p = {}
        # Created in the order the variant applies them (flax draws init keys in call order).
        for op in self.variant.split("_"):
            if op == "ihh":
                p["ihh_kernel"] = self.param("ihh_kernel", ihh_init, (hr, ks, ks), self.param_dtype)
                p["ihh_bias"] = self.param("ihh_bias", zeros, (hr,), self.param_dtype)
            elif op == "chh":
                p["chh_kernel"] = self.param("chh_kernel", chh_init, (hr, hh), self.param_dtype)
                p["chh_bias"] = self.param("chh_bias", zeros, (hh,), self.param_dtype)
        logits_fn = functools.partial(
            hal_logits, variant=self.variant,
            kv_grid=None if kv_grid is None else tuple(kv_grid),
            num_prefix_tokens=num_prefix_tokens,
        )
        # Without sown maps or attention dropout, the backward pass recomputes the logits, IHH,
        # CHH and the maps (see _attend).
        out = _attend(self, q, k, v, p, logits_fn, self.attn_drop, train).reshape(b, n, c)
        out = self._dense(c, "proj")(out)
        return nn.Dropout(self.proj_drop)(out, deterministic=not train)
