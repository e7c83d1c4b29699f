"""Initializers, activations, Dense params, DropPath: the small pieces every layer uses."""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]
Activation = str | Callable[[jax.Array], jax.Array]

# timm's trunc_normal_(std=.02) truncates at +-2 in absolute units, i.e. it is in practice an
# untruncated N(0, 0.02^2); jax's truncated_normal cuts at 2 sigma and shrinks the std.
timm_trunc_normal: Initializer = nn.initializers.normal(stddev=0.02)


def torch_conv_uniform(fan_in: int) -> Initializer:
    """PyTorch's default Conv2d init (kaiming_uniform a=sqrt(5)): U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # erf form: PyTorch's, timm's default
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def get_activation(act: Activation) -> Callable[[jax.Array], jax.Array]:
    """An activation function from its name (`ACTIVATIONS`) or the function itself."""
    if callable(act):
        return act
    try:
        return ACTIVATIONS[act]
    except KeyError:
        raise ValueError(
            f"Unknown activation {act!r}; choose one of {sorted(ACTIVATIONS)} or pass a callable."
        ) from None


class DenseParams(nn.Module):
    """The params of ``nn.Dense(features)`` (``kernel`` ``[in, features]``, optional ``bias``:
    the same names, shapes, init and creation order), returned as a dict for `dense`."""

    features: int
    use_bias: bool = True
    kernel_init: Initializer = timm_trunc_normal
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, in_features: int) -> dict[str, jax.Array]:
        p = {"kernel": self.param("kernel", self.kernel_init, (in_features, self.features),
                                  self.param_dtype)}
        if self.use_bias:
            p["bias"] = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        return p


def dense(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """``x @ kernel + bias`` over the last axis (`DenseParams`' dict; ``bias`` optional)."""
    y = jnp.einsum("...i,io->...o", x, p["kernel"])
    return y + p["bias"] if "bias" in p else y


def cast_tree(tree: Any, dtype: Dtype | None) -> Any:
    """Every floating leaf of ``tree`` cast to ``dtype`` (None: unchanged), as Flax layers promote
    their params to the compute dtype."""
    if dtype is None:
        return tree
    return jax.tree.map(lambda t: t.astype(dtype) if jnp.issubdtype(t.dtype, jnp.floating) else t,
                        tree)


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
