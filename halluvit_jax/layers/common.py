"""Small building blocks shared by every backbone: initializers, activations, DropPath."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
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


def _ln_normalize(x, mean, rstd, scale, bias):
    """LayerNorm's output from ``x`` and its statistics, in ``x``'s dtype (the forward pass and
    every backward-pass rebuild use this one formula)."""
    y = (x.astype(jnp.float32) - mean) * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def _layer_norm_fwd(x, scale, bias, epsilon):
    _, mean, rstd = _ln_stats(x, epsilon)
    return _ln_normalize(x, mean, rstd, scale, bias), (x, mean, rstd, scale, bias)


def _layer_norm_grads(x, mean, rstd, scale, g):
    """``(dx, dscale, dbias)`` of ``layer_norm`` at ``x`` (with its statistics) for cotangent ``g``;
    ``dx`` in ``x``'s dtype, the param grads in float32."""
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
    return dx.astype(x.dtype), dscale, dbias


def _layer_norm_bwd(epsilon, res, g):
    x, mean, rstd, scale, bias = res
    # Tied to g: otherwise XLA shares the token-sized broadcasts of mean, 1/std and scale
    # between this pass and the forward one, keeping them alive in between (see after()).
    x, mean, rstd, scale = (after(t, g) for t in (x, mean, rstd, scale))
    dx, dscale, dbias = _layer_norm_grads(x, mean, rstd, scale, g)
    return dx, dscale.astype(scale.dtype), dbias.astype(bias.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@dataclasses.dataclass(frozen=True)
class PreNorm:
    """``layer_norm(x, scale, bias, epsilon)`` not computed yet: what ``LayerNorm(defer=True)``
    returns.

    A layer that reads its input only through matmuls (`SplitDense`, `Mlp`, the first factor of
    `CompactMlp`) fuses the norm into them (`norm_dense`, ``dense_act_dense(norm=...)``): their
    backward pass then rebuilds the normalized tokens from ``x``, which the residual stream keeps
    alive anyway, instead of keeping them as a second token-sized tensor (2 per transformer
    block: 24 x 9.2 MiB for a DeiT-S train step at batch 32, the memory PyTorch also spends).
    Any other consumer calls :func:`materialize`. Values and gradients are those of the unfused
    norm followed by the layer.
    """

    x: jax.Array
    scale: jax.Array
    bias: jax.Array
    epsilon: float

    @property
    def shape(self) -> tuple[int, ...]:
        return self.x.shape

    @property
    def dtype(self):
        return self.x.dtype

    @property
    def ndim(self) -> int:
        return self.x.ndim

    @property
    def norm(self) -> tuple[jax.Array, jax.Array]:
        return self.scale, self.bias

    def materialize(self) -> jax.Array:
        return layer_norm(self.x, self.scale, self.bias, self.epsilon)


def materialize(x: jax.Array | PreNorm) -> jax.Array:
    """The tokens themselves: ``x``, or the normalized tokens of a `PreNorm`."""
    return x.materialize() if isinstance(x, PreNorm) else x


def split_prenorm(x: jax.Array | PreNorm) -> tuple[jax.Array, tuple | None, float]:
    """``(x, norm, epsilon)`` for the fused ops: a `PreNorm`'s input and ``(scale, bias)``, or
    an array with ``norm=None``."""
    return (x.x, x.norm, x.epsilon) if isinstance(x, PreNorm) else (x, None, 0.0)


# The fused ops take ``norm``: None (the input is used as it is) or ``(scale, bias)`` of a
# LayerNorm applied first. These three helpers are the norm's share of their passes.
def _norm_fwd(x, norm, epsilon):
    """The matmul input and the statistics the backward pass needs to rebuild it."""
    if norm is None:
        return x, ()
    y, (_, mean, rstd, _, _) = _layer_norm_fwd(x, *norm, epsilon)
    return y, (mean, rstd)


def _norm_tie(x, norm, stats, g):
    """``x``, the norm's params and statistics, tied to the cotangent ``g`` so that what the
    backward pass rebuilds from them runs there (see after() and _layer_norm_bwd)."""
    tie = lambda ts: None if ts is None else tuple(after(t, g) for t in ts)  # noqa: E731
    return after(x, g), tie(norm), tie(stats)


def _norm_rebuild(x, norm, stats):
    """The matmul input again, in the backward pass (from the tied ``x`` and ``stats``)."""
    if norm is None:
        return x
    return _ln_normalize(x, *stats, *norm)


def _norm_grads(x, norm, stats, dy):
    """``(dx, dnorm)`` from the cotangent ``dy`` of the matmul input."""
    if norm is None:
        return dy, None
    dx, dscale, dbias = _layer_norm_grads(x, *stats, norm[0], dy)
    return dx, (dscale.astype(norm[0].dtype), dbias.astype(norm[1].dtype))


def _affine(x, kernel, bias):
    y = jnp.einsum("...i,io->...o", x, kernel)
    return y if bias is None else y + bias


def _rows(t: jax.Array) -> jax.Array:
    return t.reshape(-1, t.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def norm_dense(x, norm, kernels, biases, epsilon):
    """``y @ kernels[i] + biases[i]`` for each i, with ``y = layer_norm(x, *norm, epsilon)``.

    Returns a tuple (one output per kernel; a bias may be None). Custom VJP: the backward pass
    keeps ``x``, the per-token mean and 1/std, and rebuilds ``y`` (see `PreNorm`).
    """
    return _norm_dense_fwd(x, norm, kernels, biases, epsilon)[0]


def _norm_dense_fwd(x, norm, kernels, biases, epsilon):
    y, stats = _norm_fwd(x, norm, epsilon)
    outs = tuple(_affine(y, k, b) for k, b in zip(kernels, biases))
    return outs, (x, norm, stats, kernels, tuple(b is not None for b in biases))


def _norm_dense_bwd(epsilon, res, gs):
    x, norm, stats, kernels, has_bias = res
    x, norm, stats = _norm_tie(x, norm, stats, gs[0])
    y = _rows(_norm_rebuild(x, norm, stats))
    gs = tuple(_rows(g) for g in gs)
    dkernels = tuple(y.T @ g for g in gs)
    dbiases = tuple(jnp.sum(g, axis=0) if hb else None for g, hb in zip(gs, has_bias))
    dy = functools.reduce(jnp.add, (g @ k.T for g, k in zip(gs, kernels)))
    dx, dnorm = _norm_grads(x, norm, stats, dy.reshape(x.shape))
    return dx, dnorm, dkernels, dbiases


norm_dense.defvjp(_norm_dense_fwd, _norm_dense_bwd)


def dense_act_dense(x, kernel1, bias1, kernel2, bias2, act, norm=None, epsilon=1e-6):
    """``act(x @ kernel1 + bias1) @ kernel2 + bias2`` over the last axis (a transformer FFN);
    with ``norm=(scale, bias)``, ``x`` is first normalized by ``layer_norm(x, *norm, epsilon)``.

    Custom VJP: the backward pass keeps ``x`` and the hidden pre-activation only, and recomputes
    the activation's output (plain autodiff also keeps that hidden-sized tensor as the input of
    the second matmul: 12 x 39 MB for a DeiT-S train step at batch 32) and the normalized input
    (see `PreNorm`). ``act`` is any function (static); its own VJP is used for the recomputed
    hidden layer.
    """
    return _dense_act_dense(x, norm, kernel1, bias1, kernel2, bias2, act, epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _dense_act_dense(x, norm, kernel1, bias1, kernel2, bias2, act, epsilon):
    return _dense_act_dense_fwd(x, norm, kernel1, bias1, kernel2, bias2, act, epsilon)[0]


def _dense_act_dense_fwd(x, norm, kernel1, bias1, kernel2, bias2, act, epsilon):
    y, stats = _norm_fwd(x, norm, epsilon)
    hidden = jnp.einsum("...i,ih->...h", y, kernel1) + bias1
    out = jnp.einsum("...h,ho->...o", act(hidden), kernel2) + bias2
    return out, (x, norm, stats, hidden, kernel1, kernel2)


def _dense_act_dense_bwd(act, epsilon, res, g):
    x, norm, stats, hidden, kernel1, kernel2 = res
    hidden = after(hidden, g)  # recompute the activation in the backward pass: see after()
    x, norm, stats = _norm_tie(x, norm, stats, g)
    y = _rows(_norm_rebuild(x, norm, stats))
    hidden, g = _rows(hidden), _rows(g)
    a, act_vjp = jax.vjp(act, hidden)
    dkernel2 = a.T @ g
    (dhidden,) = act_vjp(g @ kernel2.T)
    dx, dnorm = _norm_grads(x, norm, stats, (dhidden @ kernel1.T).reshape(x.shape))
    return (dx, dnorm, y.T @ dhidden, jnp.sum(dhidden, axis=0), dkernel2, jnp.sum(g, axis=0))


_dense_act_dense.defvjp(_dense_act_dense_fwd, _dense_act_dense_bwd)


class SplitDense(nn.Module):
    """A Dense layer (params ``kernel`` ``[in, sum(splits)]``, ``bias``: the same names, shapes and
    init as ``nn.Dense``) that returns its output already split into ``splits`` column groups.

    Each group is its own matmul against a slice of the kernel, instead of one matmul whose
    output is sliced: slicing a weight is free, while slicing a ``[B, N, 3C]`` activation costs
    three activation-sized copies in the forward pass and three zero-padded activation-sized
    buffers in the backward pass (the fused qkv projection of attention). Given a `PreNorm`,
    the norm is fused in (`norm_dense`).
    """

    splits: tuple[int, ...]
    use_bias: bool = True
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array | PreNorm) -> tuple[jax.Array, ...]:
        total = sum(self.splits)
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], total), self.param_dtype)
        bias = self.param("bias", self.bias_init, (total,), self.param_dtype) if self.use_bias else None
        x, norm, epsilon = split_prenorm(x)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        bounds = [0, *itertools.accumulate(self.splits)]
        kernels = tuple(kernel[:, a:b] for a, b in zip(bounds, bounds[1:]))
        biases = tuple(None if bias is None else bias[a:b] for a, b in zip(bounds, bounds[1:]))
        if norm is not None:
            return norm_dense(x, norm, kernels, biases, epsilon)
        return tuple(_affine(x, k, b) for k, b in zip(kernels, biases))


def batch_statistics(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Mean and (biased, two-pass) variance of ``x`` over ``axes``, in float32."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=axes)
    return mean, jnp.mean(jnp.square(xf - mean), axis=axes)


def batch_normalize(x, mean, rstd, scale, bias):
    """``(x - mean) * (rstd * scale) + bias`` in float32: BatchNorm's output from statistics
    (batch ones in train mode, running ones in eval mode)."""
    return (x.astype(jnp.float32) - mean) * (rstd * scale.astype(jnp.float32)) + bias.astype(jnp.float32)


def batch_norm_grads(xhat, rstd, scale, g, axes, count):
    """``(dx, dscale, dbias)`` of ``xhat * scale + bias`` with ``xhat`` normalized by statistics
    of ``count`` elements over ``axes`` (float32; ``g`` may broadcast against ``xhat``)."""
    dbias = jnp.sum(g, axis=axes)
    dscale = jnp.sum(g * xhat, axis=axes)
    dx = (rstd * scale.astype(jnp.float32)) * (g - dbias / count - xhat * (dscale / count))
    return dx, dscale, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon):
    """BatchNorm over the last axis with the batch's statistics (over all other axes, float32).

    Returns ``(y, mean, var)``: the statistics are for the running averages and are treated as
    constants (no gradient flows back through them). Custom VJP: the backward pass keeps ``x``
    and the per-feature statistics and rebuilds the normalized values; autodiff of flax's
    BatchNorm keeps two more tensors of ``x``'s size.
    """
    return _batch_norm_train_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon):
    axes = tuple(range(x.ndim - 1))
    mean, var = batch_statistics(x, axes)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = batch_normalize(x, mean, rstd, scale, bias)
    return (y.astype(x.dtype), mean, var), (x, mean, rstd, scale)


def _batch_norm_train_bwd(epsilon, res, cotangents):
    x, mean, rstd, scale = res
    g = cotangents[0]
    x, mean, rstd, scale = (after(t, g) for t in (x, mean, rstd, scale))  # see _layer_norm_bwd
    axes = tuple(range(x.ndim - 1))
    xhat = (x.astype(jnp.float32) - mean) * rstd
    dx, dscale, dbias = batch_norm_grads(xhat, rstd, scale, g.astype(jnp.float32), axes,
                                         math.prod(x.shape[:-1]))
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def batch_norm_variables(module: nn.Module, shape: tuple[int, ...], param_dtype: Dtype):
    """Create on ``module`` the variables of ``nn.BatchNorm`` over features of ``shape`` (params
    ``scale``/``bias``, batch_stats ``mean``/``var``: same names, shapes, dtypes and init) and
    return ``(scale, bias, mean_variable, var_variable)``. Call from a compact method."""
    ra_mean = module.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), shape)
    ra_var = module.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), shape)
    scale = module.param("scale", nn.initializers.ones, shape, param_dtype)
    bias = module.param("bias", nn.initializers.zeros, shape, param_dtype)
    return scale, bias, ra_mean, ra_var


def update_running_stats(module: nn.Module, ra_mean, ra_var, mean, var, momentum: float) -> None:
    """flax BatchNorm's running-average update (skipped while initializing)."""
    if not module.is_initializing():
        ra_mean.value = momentum * ra_mean.value + (1 - momentum) * jax.lax.stop_gradient(mean)
        ra_var.value = momentum * ra_var.value + (1 - momentum) * jax.lax.stop_gradient(var)


class BatchNorm(nn.Module):
    """``nn.BatchNorm`` over the last axis (same variables, running averages and call signature
    ``(x, use_running_average)``; statistics two-pass in float32, i.e. ``use_fast_variance=False``)
    whose train-mode backward pass keeps only ``x`` and the statistics (`batch_norm_train`)."""

    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool = False) -> jax.Array:
        scale, bias, ra_mean, ra_var = batch_norm_variables(self, (x.shape[-1],), self.param_dtype)
        dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        x = x.astype(dtype)
        if use_running_average:
            rstd = jax.lax.rsqrt(ra_var.value + self.epsilon)
            return batch_normalize(x, ra_mean.value, rstd, scale, bias).astype(dtype)
        y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
        update_running_stats(self, ra_mean, ra_var, mean, var, self.momentum)
        return y


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with params ``scale``/``bias`` (same names and init as
    ``flax.linen.LayerNorm``), using :func:`layer_norm`'s memory-lean backward pass."""

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, defer: bool = False) -> jax.Array | PreNorm:
        """The normalized tokens, or with ``defer=True`` a `PreNorm` for the next layer to fuse."""
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        out = PreNorm(x.astype(dtype), scale, bias, self.epsilon)
        return out if defer else out.materialize()


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
