"""Small building blocks shared by every backbone: initializers, activations, DropPath."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

# timm's trunc_normal_(std=.02) truncates at +-2 in absolute units, i.e. it is in practice an
# untruncated N(0, 0.02^2); jax's truncated_normal cuts at 2 sigma and shrinks the std.
timm_trunc_normal: Initializer = nn.initializers.normal(stddev=0.02)


def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU in the erf form (PyTorch's default, used by timm's DeiT and PVTv2)."""
    return nn.gelu(x, approximate=False)


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
