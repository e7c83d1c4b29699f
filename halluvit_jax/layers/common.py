"""Initializers, activations, Dense params, `PreNorm`, dtype promotion, DropPath: the small
pieces every layer uses."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from halluvit_jax.layers import axes

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
    the same names, shapes, init and creation order), returned as a dict for `dense`.
    ``axes``: the logical names of the kernel's (in, out) dimensions (`halluvit_jax.layers.axes`);
    the bias takes the second."""

    features: int
    use_bias: bool = True
    kernel_init: Initializer = timm_trunc_normal
    param_dtype: Dtype = jnp.float32
    axes: tuple[str | None, str | None] = (None, None)

    @nn.compact
    def __call__(self, in_features: int) -> dict[str, jax.Array]:
        p = {"kernel": axes.param(self, "kernel", self.kernel_init, (in_features, self.features),
                                  self.param_dtype, self.axes)}
        if self.use_bias:
            p["bias"] = axes.param(self, "bias", nn.initializers.zeros, (self.features,),
                                   self.param_dtype, self.axes[1:])
        return p


def dense(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """``x @ kernel + bias`` over the last axis (`DenseParams`' dict; ``bias`` optional)."""
    y = jnp.einsum("...i,io->...o", x, p["kernel"])
    return y + p["bias"] if "bias" in p else y


@dataclasses.dataclass(frozen=True)
class PreNorm:
    """``layer_norm(x, scale, bias, epsilon)``, not applied yet: what ``LayerNorm(defer=True)``
    returns, for `Attention`, `HalAttention`, `Mlp` and `CompactMlp` to take as input.

    The plain path applies the norm first (`halluvit_jax.layers.norm.materialize`). The fused
    path folds it into the layer's first matmul (`halluvit_jax.layers.fused`), whose backward
    pass then rebuilds the normalized tokens from ``x`` (kept by the residual stream anyway)
    instead of keeping a second token-sized tensor.
    """

    x: jax.Array
    scale: jax.Array
    bias: jax.Array
    epsilon: float = 1e-6

    shape = property(lambda self: self.x.shape)
    dtype = property(lambda self: self.x.dtype)
    ndim = property(lambda self: self.x.ndim)

    def astype(self, dtype: Dtype) -> PreNorm:
        """The tokens in ``dtype`` (the norm's own params stay: it normalizes in float32)."""
        return PreNorm(self.x.astype(dtype), self.scale, self.bias, self.epsilon)


jax.tree_util.register_dataclass(PreNorm, data_fields=["x", "scale", "bias"], meta_fields=["epsilon"])


def compute_dtype(module: nn.Module, x: jax.Array | PreNorm) -> Dtype:
    """A layer's compute dtype: its ``dtype``, else the promotion of the input's dtype and its
    ``param_dtype`` (as flax layers compute)."""
    return module.dtype or jnp.result_type(x.dtype, module.param_dtype)


# Variables that keep their dtype whatever the compute dtype: BatchNorm's (it runs in float32).
FLOAT32_VARIABLES = frozenset({"bn", "bn_mean", "bn_var"})


def promote(module: nn.Module, x: Any, tree: Any) -> tuple[Any, Any]:
    """``x`` (an array, a `PreNorm`, or a tuple of them and Nones) and the floating weights of
    ``tree`` in ``module``'s compute dtype (`compute_dtype` of the first input); entries named
    in `FLOAT32_VARIABLES` stay as they are."""
    inputs = x if isinstance(x, tuple) else (x,)
    dtype = compute_dtype(module, inputs[0])

    def cast(path, w):
        if FLOAT32_VARIABLES & {getattr(k, "key", None) for k in path}:
            return w
        return w.astype(dtype) if jnp.issubdtype(w.dtype, jnp.floating) else w

    tree = jax.tree_util.tree_map_with_path(cast, tree)
    inputs = tuple(None if t is None else t.astype(dtype) for t in inputs)
    return (inputs if isinstance(x, tuple) else inputs[0]), tree


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


# ----------------------------------------------------------------------------------------------
# Grouped 3x3 convolutions under a mesh


def _grouped_conv3x3(x, kernel, groups: int, preferred_element_type):
    return jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups,
                                        preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _grouped_conv3x3_on_mesh(x, kernel, groups: int, preferred_element_type):
    return _grouped_conv3x3(x, kernel, groups, preferred_element_type)


def _grouped_conv3x3_on_mesh_fwd(x, kernel, groups, preferred_element_type):
    return _grouped_conv3x3(x, kernel, groups, preferred_element_type), (x, kernel)


def _grouped_conv3x3_on_mesh_bwd(groups, preferred_element_type, res, ct):
    x, kernel = res
    _, vjp_x = jax.vjp(lambda a: _grouped_conv3x3(a, kernel, groups, preferred_element_type), x)
    (d_x,) = vjp_x(ct)
    b, h, w, c = x.shape
    cin, cout = c // groups, kernel.shape[-1] // groups  # per group
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(jnp.float32)
    ct = ct.astype(jnp.float32).reshape(b, h, w, groups, cout)
    d_kernel = jnp.stack([jnp.stack([
        jnp.einsum("bhwgi,bhwgo->igo", padded[:, ty:ty + h, tx:tx + w].reshape(b, h, w, groups, cin),
                   ct).reshape(cin, groups * cout) for tx in range(3)]) for ty in range(3)])
    return d_x, d_kernel.astype(kernel.dtype)


_grouped_conv3x3_on_mesh.defvjp(_grouped_conv3x3_on_mesh_fwd, _grouped_conv3x3_on_mesh_bwd)


def grouped_conv3x3(x: jax.Array, kernel: jax.Array, groups: int, preferred_element_type=None) -> jax.Array:
    """``lax.conv`` NHWC/HWIO, 3x3, stride 1, zero 'same' padding, ``feature_group_count=groups``
    (``kernel`` ``[3, 3, C / groups, C_out]``).

    Traced on a mesh with a ``model`` axis (`axes.mesh_beyond_batch`), its kernel gradient is
    nine products summed over the batch and the grid, not autodiff's convolution with
    ``batch_group_count``: XLA's SPMD partitioners (Shardy and GSPMD, jax 0.10.2) multiply that
    convolution's result by the size of every mesh axis the input is replicated over, so under
    ``model=2`` DeiT-S-hal's IHH kernel, NextViT's MHCA kernels and the FFN dwconv kernel of a
    PVTv2 whose hidden width does not divide by the axis got twice their gradients
    (`tests/test_train_sharding.py`). Elsewhere, and for the forward and the input gradient
    always, it is autodiff's program."""
    conv = _grouped_conv3x3_on_mesh if axes.mesh_beyond_batch() else _grouped_conv3x3
    return conv(x, kernel, groups, preferred_element_type)
