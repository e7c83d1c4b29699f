"""Multi-head self-attention (`Attention`) and hMHSA (`HalAttention`, docs/design.md section 2).

Both share one call signature so that a backbone can swap one for the other::

    y = attn(x, kv, kv_grid=(Hk, Wk), num_prefix_tokens=P, train=train)

- ``x``: query tokens ``[B, N, C]``, or a `PreNorm` (the block's LayerNorm, left to this layer).
- ``kv``: optional reduced key/value tokens ``[B, Nk, C]`` (PVTv2 SRA, NextViT E-MHSA). When it
  is None the keys are ``x`` itself and q, k, v come from one projection ``qkv``; otherwise
  ``q`` comes from ``x`` and ``kv`` (k and v) from ``kv``.
- ``kv_grid``: the ``(Hk, Wk)`` grid of the non-prefix keys. hMHSA needs it (IHH is a 3x3 conv
  over the key grid); it is never guessed from ``sqrt(Nk)``.
- ``num_prefix_tokens``: leading non-grid keys (DeiT's class token), passed through IHH.

`mhsa` and `hmhsa` below are the forward passes, as the paper writes them; the modules create
the parameters and run them (``impl="plain"``) or the CPU kernels of `halluvit_jax.layers.fused`
(``"fused"``; ``"auto"`` picks per platform, see `halluvit_jax.layers.config.run`). The forward
passes read the projections per part: ``q``, ``k``, ``v`` and ``proj`` (`per_head_views`), sliced
from the stored ``qkv`` (or ``q`` and ``kv``) kernel, so that under a sharding mesh every model
shard holds whole heads of each part (`halluvit_jax.layers.axes`).

Softmaxed maps ``[B, heads, N, Nk]`` (real heads first) are sown into the 'intermediates'
collection as ``attn`` when it is mutable: ``model.apply(..., mutable=['intermediates'])``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from halluvit_jax.layers import attention_accel, axes, fused
from halluvit_jax.layers.common import (
    DenseParams,
    Dtype,
    Initializer,
    PreNorm,
    dense,
    promote,
    timm_trunc_normal,
    torch_conv_uniform,
)
from halluvit_jax.layers.config import HAL_INITS, HAL_STEPS, HAL_VARIANTS, run, tracing_for
from halluvit_jax.layers.kernels import hmhsa_pallas, hmhsa_triton
from halluvit_jax.layers.norm import materialize

MapsHook = Callable[[jax.Array], jax.Array]  # [B, N, H, Nk] maps -> maps (sow, dropout)


def project_qkv(p, x, kv):
    """q from ``x``; k and v from the reduced tokens ``kv``, or from ``x`` when it is None."""
    x = materialize(x)
    source = x if kv is None else kv
    return dense(p["q"], x), dense(p["k"], source), dense(p["v"], source)


def mhsa(p, x, kv=None, *, num_heads: int, hook: MapsHook | None = None) -> jax.Array:
    """Multi-head self-attention: ``proj(softmax(q k^T / sqrt(d)) v)`` over ``h`` heads."""
    b, n, c = x.shape
    h, d = num_heads, c // num_heads
    q, k, v = (t.reshape(b, t.shape[1], h, d) for t in project_qkv(p, x, kv))
    if hook is None and tracing_for("onnx"):  # two matmuls, heads leading, one softmax
        logits = jnp.einsum("bnhd,bmhd->bhnm", q * jnp.asarray(1 / math.sqrt(d), q.dtype), k)
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhnm,bmhd->bnhd", attn, v)
    elif hook is None:  # cuDNN's fused kernel on GPU (bf16/fp16), XLA's elsewhere
        out = jax.nn.dot_product_attention(q, k, v)
    else:
        logits = jnp.einsum("bnhd,bmhd->bnhm", q, k) / math.sqrt(d)
        attn = hook(jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype))
        out = jnp.einsum("bnhm,bmhd->bnhd", attn, v)
    return dense(p["proj"], out.reshape(b, n, c))


def intra_head_hallucination(logits, kernel, bias, kv_grid: Sequence[int], num_prefix_tokens: int):
    """IHH: a 3x3 depthwise conv (one kernel per head, zero padding, with bias) over the key grid
    of every query row. ``logits`` ``[B, N, H, Nk]``, ``kernel`` ``[H, 3, 3]`` (PyTorch's
    cross-correlation), ``bias`` ``[H]``; prefix key columns pass through unchanged."""
    b, n, h, nk = logits.shape
    hk, wk = kv_grid
    prefix, grid = logits[..., :num_prefix_tokens], logits[..., num_prefix_tokens:]
    maps = grid.reshape(b * n, h, hk, wk)  # every query row is an image with H channels
    out = jax.lax.conv_general_dilated(
        maps, kernel[:, None].astype(maps.dtype), window_strides=(1, 1), padding="SAME",
        dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=h,
    ) + bias.astype(maps.dtype)[:, None, None]
    return jnp.concatenate([prefix, out.reshape(b, n, h, hk * wk)], axis=-1)


def cross_head_hallucination(logits, kernel, bias):
    """CHH: a 1x1 conv across heads, ``[B, N, Hin, Nk] -> [B, N, Hout, Nk]``; ``kernel``
    ``[Hin, Hout]``, ``bias`` ``[Hout]``."""
    out = jnp.einsum("bnhm,hg->bngm", logits, kernel.astype(logits.dtype))
    return out + bias.astype(logits.dtype)[:, None]


def hallucinate(real, p, variant: str, kv_grid, num_prefix_tokens: int) -> jax.Array:
    """The hallucinated logits from the real ones, ``[B, N, hr, Nk] -> [B, N, hh, Nk]``."""
    ihh = lambda a: intra_head_hallucination(  # noqa: E731
        a, p["ihh_kernel"], p["ihh_bias"], kv_grid, num_prefix_tokens)
    chh = lambda a: cross_head_hallucination(a, p["chh_kernel"], p["chh_bias"])  # noqa: E731
    for step in HAL_STEPS[variant]:
        real = {"ihh": ihh, "chh": chh}[step](real)
    return real


def hmhsa(p, x, kv=None, *, num_heads: int, variant: str, kv_grid, num_prefix_tokens: int,
          hook: MapsHook | None = None) -> jax.Array:
    """hMHSA: ``h/2`` real heads (q', k' of ``C/2`` channels), ``h/2`` hallucinated from their
    logits (IHH and/or CHH), softmax over all ``h``, a full-width v, the output projection."""
    b, n, c = x.shape
    h, d = num_heads, c // num_heads
    hr = h // 2
    q, k, v = project_qkv(p, x, kv)
    q, k, v = q.reshape(b, n, hr, d), k.reshape(b, -1, hr, d), v.reshape(b, -1, h, d)
    real = jnp.einsum("bnhd,bmhd->bnhm", q, k) / math.sqrt(d)  # [B, N, hr, Nk]
    hal = hallucinate(real, p, variant, kv_grid, num_prefix_tokens)  # [B, N, hh, Nk]
    logits = jnp.concatenate([real, hal], axis=2).astype(jnp.float32)
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if hook is not None:
        attn = hook(attn)
    out = jnp.einsum("bnhm,bmhd->bnhd", attn, v)
    return dense(p["proj"], out.reshape(b, n, c))


def hmhsa_on_core(core, p, x, kv=None, *, num_heads: int, variant: str, kv_grid,
                  num_prefix_tokens: int) -> jax.Array:
    """`hmhsa` with its attention core (logits, hallucination, softmax, ``attn @ v``) computed by
    ``core(q, k, v, hal_params, variant=, kv_grid=, num_prefix_tokens=)`` on ``[B, tokens,
    heads, d]`` projections (`attention_accel.hmhsa_core`, `hmhsa_pallas.hmhsa_core`)."""
    b, n, c = x.shape
    h, d = num_heads, c // num_heads
    q, k, v = project_qkv(p, x, kv)
    q, k, v = q.reshape(b, n, h // 2, d), k.reshape(b, -1, h // 2, d), v.reshape(b, -1, h, d)
    out = core(q, k, v, {name: p[name] for name in p if name.startswith(("ihh_", "chh_"))},
               variant=variant, kv_grid=kv_grid, num_prefix_tokens=num_prefix_tokens)
    return dense(p["proj"], out.reshape(b, n, c))


def _per_batch_shard(core):
    """``core(q, k, v, params, **static)`` run per data-parallel shard under a device mesh
    (`halluvit_jax.layers.axes.per_batch_shard`): XLA cannot partition a Mosaic or Triton
    kernel."""
    def call(q, k, v, params, **static):
        return axes.per_batch_shard(functools.partial(core, **static), (0, 0, 0, None))(q, k, v, params)
    return call


def _gpu_core(q, k, v, params, **static):
    """The Triton core where `hmhsa_triton.supports` the layer's shapes, else the accel core."""
    if hmhsa_triton.supports(q.shape, k.shape):
        return _per_batch_shard(hmhsa_triton.hmhsa_core)(q, k, v, params, **static)
    return attention_accel.hmhsa_core(q, k, v, params, **static)


def hmhsa_pallas_impl(p, x, kv=None, **kwargs) -> jax.Array:
    """``impl="pallas"``: hMHSA's core as Pallas kernels: Mosaic on TPU
    (`hmhsa_pallas`), Triton on CUDA (`hmhsa_triton`; layers of more than
    `hmhsa_triton.MAX_REAL_HEADS` real heads run the accel core), the Mosaic kernel in Pallas'
    interpreter on CPU (for tests); elsewhere (ROCm) the accel core. On a mesh of several
    devices the kernels run per batch shard."""
    on_core = lambda core: functools.partial(hmhsa_on_core, _per_batch_shard(core), **kwargs)  # noqa: E731
    return jax.lax.platform_dependent(
        p, x, kv,
        tpu=on_core(hmhsa_pallas.hmhsa_core),
        cuda=functools.partial(hmhsa_on_core, _gpu_core, **kwargs),
        cpu=on_core(functools.partial(hmhsa_pallas.hmhsa_core, interpret=True)),
        default=functools.partial(hmhsa_on_core, attention_accel.hmhsa_core, **kwargs))


# ----------------------------------------------------------------------------------------------
# Modules


def _slice_dense(p: dict, start: int, stop: int) -> dict:
    """The Dense params of output columns ``start:stop`` (slicing a weight is free)."""
    return {name: w[..., start:stop] for name, w in p.items()}


def _by_head(p: dict, d: int) -> dict:
    """A q, k or v projection's Dense params laid out per head of ``d`` channels."""
    kernel = p["kernel"]
    out = {"kernel": axes.constrain_view(kernel, (kernel.shape[0], -1, d),
                                         ("embed", "heads", "head_dim"))}
    if "bias" in p:
        out["bias"] = axes.constrain_view(p["bias"], (-1, d), ("heads", "head_dim"))
    return out


def per_head_views(p: dict, widths: tuple[int, int, int], head_dim: int) -> dict:
    """The stored projections as the forward passes read them: Dense params ``q``, ``k``, ``v``
    of widths ``widths`` (sliced from ``qkv``, or ``q`` and the two parts of ``kv``) and
    ``proj``; other entries (hMHSA's IHH/CHH params) as they are.

    Each is laid out per head (`halluvit_jax.layers.axes.constrain_view`): under sharding rules
    that split ``heads`` over a mesh axis, every shard holds whole heads of q, k and v and the
    matching rows of ``proj``, whatever the unequal widths of hMHSA's q' | k' | v.
    """
    views = {name: w for name, w in p.items() if name not in ("qkv", "kv", "q")}
    if "qkv" in p:
        splits = [("q", 0, widths[0]), ("k", widths[0], widths[0] + widths[1]),
                  ("v", widths[0] + widths[1], sum(widths))]
        views.update({part: _slice_dense(p["qkv"], a, b) for part, a, b in splits})
    else:
        views["q"] = p["q"]
        views["k"], views["v"] = (_slice_dense(p["kv"], 0, widths[1]),
                                  _slice_dense(p["kv"], widths[1], widths[1] + widths[2]))
    views.update({part: _by_head(views[part], head_dim) for part in ("q", "k", "v")})
    kernel = p["proj"]["kernel"]
    views["proj"] = {**p["proj"], "kernel": axes.constrain_view(
        kernel, (-1, head_dim, kernel.shape[-1]), ("heads", "head_dim", "embed"))}
    return views


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


class _AttentionBase(nn.Module):
    dim: int
    num_heads: int
    qkv_bias: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    kernel_init: Initializer = timm_trunc_normal
    impl: str = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def _check_dim(self, c: int) -> None:
        if c != self.dim or self.dim % self.num_heads:
            raise ValueError(
                f"{type(self).__name__}(dim={self.dim}, num_heads={self.num_heads}) got {c} "
                "channels; dim must equal the input channels and be divisible by num_heads."
            )

    def _projections(self, x, kv, widths: tuple[int, int, int]) -> dict:
        """The Dense params: ``qkv`` (or ``q`` and ``kv``) and ``proj``, timm's layout. Their
        joined head-major axis is ``"qkv"``: the forward reads it per head (`per_head_views`)."""
        make = lambda f, name, bias=self.qkv_bias, names=("embed", "qkv"): DenseParams(  # noqa: E731
            f, bias, self.kernel_init, self.param_dtype, names, name=name)(x.shape[-1])
        if kv is None:
            p = {"qkv": make(sum(widths), "qkv")}
        else:
            p = {"q": make(widths[0], "q"), "kv": make(widths[1] + widths[2], "kv")}
        p["proj"] = make(self.dim, "proj", True, ("qkv", "embed"))
        return p

    def _run(self, plain, fused_, p, x, kv, widths: tuple[int, int, int], train: bool,
             **kernels) -> jax.Array:
        """The forward pass on the path ``impl`` names (`run`), then projection dropout. Maps
        that are sown or dropped out exist only on the plain path (the hook)."""
        (x, kv), p = promote(self, (x, kv), p)
        p = per_head_views(p, widths, self.dim // self.num_heads)
        hook = None
        if self.is_mutable_collection("intermediates") or (train and self.attn_drop > 0):
            drop = nn.Dropout(self.attn_drop)

            def hook(attn):  # [B, N, H, Nk]
                self.sow("intermediates", "attn", jnp.swapaxes(attn, 1, 2))
                return drop(attn, deterministic=not train)

        out = run(self.impl, plain, fused_, p, x, kv, hook=hook, **kernels)
        return nn.Dropout(self.proj_drop)(out, deterministic=not train)


class Attention(_AttentionBase):
    """Standard multi-head self-attention (timm `Attention`), optionally on reduced keys.

    Params: ``qkv`` (``C -> 3C``) when the keys are the input, else ``q`` and ``kv``
    (``C -> 2C``); ``proj``.
    """

    @nn.compact
    def __call__(self, x: jax.Array | PreNorm, kv: jax.Array | None = None, *,
                 kv_grid: Sequence[int] | None = None, num_prefix_tokens: int = 0,
                 train: bool = False) -> jax.Array:
        c = x.shape[-1]
        self._check_dim(c)
        _check_grid(x.shape[1] if kv is None else kv.shape[1], kv_grid, num_prefix_tokens, False)
        p = self._projections(x, kv, (c, c, c))
        plain = functools.partial(mhsa, num_heads=self.num_heads)
        fused_ = functools.partial(fused.mhsa, num_heads=self.num_heads)
        return self._run(plain, fused_, p, x, kv, (c, c, c), train)


def _identity_dw_init(key, shape, dtype=jnp.float32):
    """IHH kernel starting as the identity: centre tap 1, all others 0."""
    del key
    _, kh, kw = shape
    return jnp.zeros(shape, dtype).at[:, kh // 2, kw // 2].set(1.0)


def _identity_mix_init(key, shape, dtype=jnp.float32):
    """CHH kernel starting as the identity map from real head i to hallucinated head i."""
    del key
    return jnp.eye(*shape, dtype=dtype)


class HalAttention(_AttentionBase):
    """hMHSA: half the heads computed, half hallucinated from them (docs/design.md section 2).

    Params: ``qkv`` (``C -> 2C``: q' | k' | v) when the keys are the input, else ``q``
    (``C -> C/2``) and ``kv`` (``C -> C/2 + C``); ``ihh_kernel`` ``[hr, 3, 3]``, ``ihh_bias``
    ``[hr]``; ``chh_kernel`` ``[hr, hh]``, ``chh_bias`` ``[hh]`` (as the variant needs); ``proj``.

    ``hal_init="identity"`` starts IHH and CHH as identities, so the hallucinated heads begin as
    copies of the real ones; ``"random"`` uses PyTorch's default conv init. Biases added
    uniformly over all key columns are invisible to the softmax, so ``chh_bias`` (and
    ``ihh_bias`` without prefix tokens) only matter where a later zero-padded IHH makes them
    position-dependent (variant ``"chh_ihh"``).
    """

    variant: str = "ihh_chh"
    hal_init: str = "identity"

    @nn.compact
    def __call__(self, x: jax.Array | PreNorm, kv: jax.Array | None = None, *,
                 kv_grid: Sequence[int] | None = None, num_prefix_tokens: int = 0,
                 train: bool = False) -> jax.Array:
        c = x.shape[-1]
        if self.variant not in HAL_VARIANTS:
            raise ValueError(f"Unknown hMHSA variant {self.variant!r}; choose one of {HAL_VARIANTS}.")
        if self.hal_init not in HAL_INITS:
            raise ValueError(f"hal_init must be one of {HAL_INITS}, got {self.hal_init!r}.")
        if self.num_heads % 2:
            raise ValueError(
                f"hMHSA needs an even head count (half real, half hallucinated), got "
                f"num_heads={self.num_heads}; use the nearest even count that divides dim={self.dim}."
            )
        self._check_dim(c)
        nk = x.shape[1] if kv is None else kv.shape[1]
        _check_grid(nk, kv_grid, num_prefix_tokens, required="ihh" in self.variant)
        hr = self.num_heads // 2
        half = hr * (c // self.num_heads)
        widths = (half, half, c)
        p = self._projections(x, kv, widths)
        if self.hal_init == "identity":
            ihh_init, chh_init = _identity_dw_init, _identity_mix_init
        else:
            ihh_init, chh_init = torch_conv_uniform(9), torch_conv_uniform(hr)
        zeros, dt = nn.initializers.zeros, self.param_dtype
        for op in HAL_STEPS[self.variant]:  # created in the order the variant applies them
            if op == "ihh":  # per real head
                p["ihh_kernel"] = axes.param(self, "ihh_kernel", ihh_init, (hr, 3, 3), dt,
                                             ("heads", None, None))
                p["ihh_bias"] = axes.param(self, "ihh_bias", zeros, (hr,), dt, ("heads",))
            else:  # mixes the heads
                p["chh_kernel"] = axes.param(self, "chh_kernel", chh_init, (hr, hr), dt, (None, None))
                p["chh_bias"] = axes.param(self, "chh_bias", zeros, (hr,), dt, (None,))
        kwargs = dict(num_heads=self.num_heads, variant=self.variant,
                      kv_grid=None if kv_grid is None else tuple(kv_grid),
                      num_prefix_tokens=num_prefix_tokens)
        plain = functools.partial(hmhsa, **kwargs)
        fused_ = functools.partial(fused.hmhsa, **kwargs)
        accel = functools.partial(hmhsa_on_core, attention_accel.hmhsa_core, **kwargs)
        pallas = functools.partial(hmhsa_pallas_impl, **kwargs)
        return self._run(plain, fused_, p, x, kv, widths, train, accel=accel, pallas=pallas)
