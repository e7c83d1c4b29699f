"""LayerNorm and BatchNorm (the variables of flax's modules), and `PreNorm`, a LayerNorm whose
application is left to the next layer."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from halluvit_jax.layers import fused
from halluvit_jax.layers.common import Dtype
from halluvit_jax.layers.config import dispatch


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """LayerNorm over the last axis; statistics in float32 (two-pass variance, as PyTorch)."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias
    return y.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class PreNorm:
    """``layer_norm(x, scale, bias, epsilon)``, not applied yet: what ``LayerNorm(defer=True)``
    returns, for `Attention`, `HalAttention`, `Mlp` and `CompactMlp` to take as input.

    The plain path applies the norm first (`materialize`). The fused path folds it into the
    layer's first matmul, whose backward pass then rebuilds the normalized tokens from ``x``
    (kept by the residual stream anyway) instead of keeping a second token-sized tensor.
    """

    x: jax.Array
    scale: jax.Array
    bias: jax.Array
    epsilon: float = 1e-6

    shape = property(lambda self: self.x.shape)
    dtype = property(lambda self: self.x.dtype)
    ndim = property(lambda self: self.x.ndim)


jax.tree_util.register_dataclass(PreNorm, data_fields=["x", "scale", "bias"], meta_fields=["epsilon"])


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
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        x = x.astype(self.dtype or jnp.result_type(x.dtype, self.param_dtype))
        if defer:
            return PreNorm(x, scale, bias, self.epsilon)
        plain = lambda x, s, b: layer_norm(x, s, b, self.epsilon)  # noqa: E731
        fused_ = lambda x, s, b: fused.layer_norm(x, s, b, self.epsilon)  # noqa: E731
        return dispatch(self.impl, plain, fused_, x, scale, bias)


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


def update_running_stats(module: nn.Module, ra_mean, ra_var, mean, var, momentum: float) -> None:
    """flax BatchNorm's running-average update (skipped while initializing)."""
    if not module.is_initializing():
        ra_mean.value = momentum * ra_mean.value + (1 - momentum) * jax.lax.stop_gradient(mean)
        ra_var.value = momentum * ra_var.value + (1 - momentum) * jax.lax.stop_gradient(var)


def batch_norm_variables(module: nn.Module, shape: tuple[int, ...], param_dtype: Dtype):
    """Create on ``module`` the variables of ``nn.BatchNorm`` over features of ``shape`` (params
    ``scale``/``bias``, batch_stats ``mean``/``var``: same names, shapes, dtypes and init) and
    return ``(scale, bias, mean_variable, var_variable)``. Call from a compact method."""
    ra_mean = module.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), shape)
    ra_var = module.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), shape)
    scale = module.param("scale", nn.initializers.ones, shape, param_dtype)
    bias = module.param("bias", nn.initializers.zeros, shape, param_dtype)
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
        scale, bias, ra_mean, ra_var = batch_norm_variables(self, (x.shape[-1],), self.param_dtype)
        x = x.astype(self.dtype or jnp.result_type(x.dtype, self.param_dtype))
        train = not use_running_average
        plain = lambda *a: batch_norm(*a, self.epsilon, train)  # noqa: E731
        fused_ = lambda *a: fused.batch_norm(*a, self.epsilon, train)  # noqa: E731
        y, mean, var = dispatch(self.impl, plain, fused_, x, scale, bias, ra_mean.value, ra_var.value)
        if train:
            update_running_stats(self, ra_mean, ra_var, mean, var, self.momentum)
        return y
