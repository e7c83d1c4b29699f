"""LayerNorm and BatchNorm (the variables of flax's modules); `materialize` applies a `PreNorm`
(`halluvit_jax.layers.common`), a LayerNorm whose application is left to the next layer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from halluvit_jax.layers import axes, fused
from halluvit_jax.layers.common import Dtype, PreNorm, compute_dtype
from halluvit_jax.layers.config import run


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """LayerNorm over the last axis; statistics in float32 (two-pass variance, as PyTorch)."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias
    return y.astype(x.dtype)


def materialize(x: jax.Array | PreNorm) -> jax.Array:
    """The tokens themselves: ``x``, or a `PreNorm`'s normalized tokens."""
    return layer_norm(x.x, x.scale, x.bias, x.epsilon) if isinstance(x, PreNorm) else x


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with ``flax.linen.LayerNorm``'s params (``scale``, ``bias``).

    ``defer=True`` returns a `PreNorm` for the next layer to apply (see there).
    """

    epsilon: float = 1e-6
    impl: str = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, defer: bool = False) -> jax.Array | PreNorm:
        c = x.shape[-1]
        scale = axes.param(self, "scale", nn.initializers.ones, (c,), self.param_dtype, ("embed",))
        bias = axes.param(self, "bias", nn.initializers.zeros, (c,), self.param_dtype, ("embed",))
        x = x.astype(compute_dtype(self, x))
        if defer:
            return PreNorm(x, scale, bias, self.epsilon)
        plain = lambda x, s, b: layer_norm(x, s, b, self.epsilon)  # noqa: E731
        fused_ = lambda x, s, b: fused.layer_norm(x, s, b, self.epsilon)  # noqa: E731
        return run(self.impl, plain, fused_, x, scale, bias)


def batch_norm(x, scale, bias, mean, var, epsilon, train):
    """BatchNorm over the last axis: ``(y, batch_mean, batch_var)``.

    In training the statistics are the batch's (over every other axis, float32, two-pass
    variance) and are returned for the running averages; in eval ``mean``/``var`` (the running
    averages) are used and returned unchanged.
    """
    xf = x.astype(jnp.float32)
    if train:
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(xf, axis=axes)
        var = jnp.mean(jnp.square(xf - mean), axis=axes)
    y = (xf - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias
    return y.astype(x.dtype), mean, var


def branch_affine(bn, mean, var, epsilon):
    """Parallel branches' BatchNorms (``bn``: ``scale``, ``bias`` ``[r, out]``) with statistics
    ``mean``, ``var`` ``[r, out]`` as one affine map per feature: ``(s, b)`` with
    ``s_r = gamma_r / sqrt(var_r + eps)`` ``[r, out]`` and ``b = sum_r (beta_r - mean_r * s_r)``
    ``[out]`` (float32), so that ``sum_r BN_r(y_r) = sum_r y_r * s_r + b``."""
    s = jax.lax.rsqrt(var + epsilon) * bn["scale"].astype(jnp.float32)
    return s, jnp.sum(bn["bias"].astype(jnp.float32) - mean * s, axis=0)


def branch_stats(mu, cov, w):
    """The batch mean and (biased) variance ``[r, out]`` of branch outputs ``x @ W_r`` (``w``
    ``[r, in, out]``, float32) from the input's mean ``mu`` ``[in]`` and covariance ``cov``
    ``[in, in]``: ``mean_r = mu W_r``, ``var_r = diag(W_r^T cov W_r)`` (clipped at 0)."""
    return jnp.einsum("i,rio->ro", mu, w), jnp.maximum(jnp.einsum("rio,ij,rjo->ro", w, cov, w), 0.0)


def update_running_stats(module: nn.Module, ra_mean, ra_var, mean, var, momentum: float) -> None:
    """flax BatchNorm's running-average update (skipped while initializing)."""
    if not module.is_initializing():
        ra_mean.value = momentum * ra_mean.value + (1 - momentum) * jax.lax.stop_gradient(mean)
        ra_var.value = momentum * ra_var.value + (1 - momentum) * jax.lax.stop_gradient(var)


def batch_norm_variables(module: nn.Module, shape: tuple[int, ...], param_dtype: Dtype,
                         names: axes.Axes):
    """Create on ``module`` the variables of ``nn.BatchNorm`` over features of ``shape`` (params
    ``scale``/``bias``, batch_stats ``mean``/``var``: same names, shapes, dtypes and init; logical
    axes ``names``) and return ``(scale, bias, mean_variable, var_variable)``. Call from a
    compact method."""
    ra_mean = axes.variable(module, "batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32),
                            shape, names)
    ra_var = axes.variable(module, "batch_stats", "var", lambda s: jnp.ones(s, jnp.float32),
                           shape, names)
    scale = axes.param(module, "scale", nn.initializers.ones, shape, param_dtype, names)
    bias = axes.param(module, "bias", nn.initializers.zeros, shape, param_dtype, names)
    return scale, bias, ra_mean, ra_var


class BatchNorm(nn.Module):
    """``nn.BatchNorm`` over the last axis: the same variables, running averages and call
    signature ``(x, use_running_average)``; statistics two-pass in float32 (flax's
    ``use_fast_variance=False``)."""

    momentum: float = 0.99
    epsilon: float = 1e-5
    impl: str = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool = False) -> jax.Array:
        scale, bias, ra_mean, ra_var = batch_norm_variables(self, (x.shape[-1],), self.param_dtype,
                                                            ("embed",))
        x = x.astype(compute_dtype(self, x))
        train = not use_running_average
        plain = lambda *a: batch_norm(*a, self.epsilon, train)  # noqa: E731
        fused_ = lambda *a: fused.batch_norm(*a, self.epsilon, train)  # noqa: E731
        y, mean, var = run(self.impl, plain, fused_, x, scale, bias, ra_mean.value, ra_var.value)
        if train:
            update_running_stats(self, ra_mean, ra_var, mean, var, self.momentum)
        return y
