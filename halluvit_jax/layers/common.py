"""Small building blocks shared by every backbone: initializers, activations, DropPath."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

# timm's trunc_normal_(std=.02) truncates at +-2 in absolute units, i.e. it is in practice an
# untruncated N(0, 0.02^2); jax's truncated_normal cuts at 2 sigma and shrinks the std.
timm_trunc_normal: Initializer = nn.initializers.normal(stddev=0.02)


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def after(x: jax.Array, g: jax.Array) -> jax.Array:
    """``x``, made data-dependent on the cotangent ``g`` so that a recomputation from it runs in
    the backward pass. XLA's CPU pipeline drops ``optimization_barrier``s before scheduling and
    then hoists such recomputations into the forward pass, keeping their outputs alive in
    between; ``x + 0 * g[0]`` cannot be simplified away for floats (NaN/inf semantics) and costs
    one fused add.
    """
    return x + (g.reshape(-1)[0] * 0).astype(x.dtype)


@jax.custom_vjp
def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU in the erf form (PyTorch's default, used by timm's DeiT and PVTv2).

    Custom VJP: the backward pass keeps only ``x`` and recomputes ``Phi(x) + x phi(x)``; plain
    autodiff of the erf form keeps four hidden-sized intermediates per MLP (the largest share
    of a ViT train step's activation memory).
    """
    # PyTorch's formula; XLA's CPU erf is ~1.7x cheaper than erfc.
    return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF))


def _gelu_fwd(x):
    return gelu_exact(x), x


def _gelu_bwd(x, g):
    # The barrier ties the recomputation to the incoming gradient: without it XLA merges it
    # with the forward's erfc (CSE) or hoists it into the forward pass, keeping hidden-sized
    # intermediates alive until the backward pass, which defeats the point.
    x, g = jax.lax.optimization_barrier((x, g))
    xf = x.astype(jnp.float32)
    cdf = 0.5 * (1.0 + jax.lax.erf(xf * _SQRT_HALF))
    pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * xf * xf)
    return ((g.astype(jnp.float32) * (cdf + xf * pdf)).astype(x.dtype),)


gelu_exact.defvjp(_gelu_fwd, _gelu_bwd)


@jax.custom_vjp
def softmax(x: jax.Array) -> jax.Array:
    """Softmax over the last axis whose backward pass keeps only the output (not ``exp(x)``)."""
    return jax.nn.softmax(x, axis=-1)


def _softmax_fwd(x):
    y = jax.nn.softmax(x, axis=-1)
    return y, y


def _softmax_bwd(y, g):
    return (y * (g - jnp.sum(g * y, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32 (two-pass variance, as PyTorch).

    Custom VJP: the backward pass keeps ``x`` and the per-token mean and 1/std; plain autodiff
    keeps four token-sized intermediates per norm.
    """
    return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _ln_stats(x, epsilon):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return xf, mean, jax.lax.rsqrt(var + epsilon)


def _layer_norm_fwd(x, scale, bias, epsilon):
    xf, mean, rstd = _ln_stats(x, epsilon)
    y = (xf - mean) * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(epsilon, res, g):
    x, mean, rstd, scale, bias = res
    x, mean, rstd, g = jax.lax.optimization_barrier((x, mean, rstd, g))  # see _gelu_bwd
    xhat = (x.astype(jnp.float32) - mean) * rstd
    gf = g.astype(jnp.float32)
    red = tuple(range(x.ndim - 1))
    dscale = jnp.sum(gf * xhat, axis=red)
    dbias = jnp.sum(gf, axis=red)
    dxhat = gf * scale.astype(jnp.float32)
    dx = rstd * (
        dxhat - jnp.mean(dxhat, axis=-1, keepdims=True)
        - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True)
    )
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def dense_act_dense(x, kernel1, bias1, kernel2, bias2, act):
    """``act(x @ kernel1 + bias1) @ kernel2 + bias2`` over the last axis (a transformer FFN).

    Custom VJP: the backward pass keeps ``x`` and the hidden pre-activation only, and recomputes
    the activation's output (plain autodiff also keeps that hidden-sized tensor as the input of
    the second matmul: 12 x 39 MB for a DeiT-S train step at batch 32). ``act`` is any function
    (static); its own VJP is used for the recomputed hidden layer.
    """
    return _dense_act_dense_fwd(x, kernel1, bias1, kernel2, bias2, act)[0]


def _dense_act_dense_fwd(x, kernel1, bias1, kernel2, bias2, act):
    hidden = jnp.einsum("...i,ih->...h", x, kernel1) + bias1
    out = jnp.einsum("...h,ho->...o", act(hidden), kernel2) + bias2
    return out, (x, hidden, kernel1, kernel2)


def _dense_act_dense_bwd(act, res, g):
    x, hidden, kernel1, kernel2 = res
    hidden = after(hidden, g)  # recompute the activation in the backward pass: see after()
    shape = x.shape
    x, hidden, g = (t.reshape(-1, t.shape[-1]) for t in (x, hidden, g))
    a, act_vjp = jax.vjp(act, hidden)
    dkernel2 = a.T @ g
    (dhidden,) = act_vjp(g @ kernel2.T)
    dx = dhidden @ kernel1.T
    return (dx.reshape(shape), x.T @ dhidden, jnp.sum(dhidden, axis=0), dkernel2,
            jnp.sum(g, axis=0))


dense_act_dense.defvjp(_dense_act_dense_fwd, _dense_act_dense_bwd)


class SplitDense(nn.Module):
    """A Dense layer (params ``kernel`` ``[in, sum(splits)]``, ``bias``: the same names, shapes and
    init as ``nn.Dense``) that returns its output already split into ``splits`` column groups.

    Each group is its own matmul against a slice of the kernel, instead of one matmul whose
    output is sliced: slicing a weight is free, while slicing a ``[B, N, 3C]`` activation costs
    three activation-sized copies in the forward pass and three zero-padded activation-sized
    buffers in the backward pass (the fused qkv projection of attention).
    """

    splits: tuple[int, ...]
    use_bias: bool = True
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        total = sum(self.splits)
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], total), self.param_dtype)
        bias = self.param("bias", self.bias_init, (total,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        outs, start = [], 0
        for width in self.splits:
            y = jnp.einsum("...i,io->...o", x, kernel[:, start : start + width])
            if bias is not None:
                y = y + bias[start : start + width]
            outs.append(y)
            start += width
        return tuple(outs)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with params ``scale``/``bias`` (same names and init as
    ``flax.linen.LayerNorm``), using :func:`layer_norm`'s memory-lean backward pass."""

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        return layer_norm(x.astype(dtype), scale, bias, self.epsilon)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_exact,
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
}


def get_activation(act: str | Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """Return an activation function given its name or the function itself."""
    if callable(act):
        return act
    try:
        return ACTIVATIONS[act]
    except KeyError:
        raise ValueError(
            f"Unknown activation {act!r}; choose one of {sorted(ACTIVATIONS)} or pass a callable."
        ) from None


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones.

    Uses the 'dropout' RNG stream. Identity when `train` is False or `rate` is 0.
    """

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    """Per-block stochastic-depth rates rising linearly from 0 to `drop_path_rate` (timm)."""
    if depth <= 1:
        return [0.0] * depth
    return [drop_path_rate * i / (depth - 1) for i in range(depth)]
