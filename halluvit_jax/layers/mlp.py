"""Feed-forward networks: the standard `Mlp` and the compact `CompactMlp` (cFFN,
docs/design.md section 3), with `RepDense` (a linear map trained as parallel Dense ->
BatchNorm branches) and the depthwise 3x3 conv of PVTv2's FFN.

`mlp`, `rep_dense` and `cffn` below are the forward passes; the modules create the parameters
and run them (``impl="plain"``) or the CPU kernels of `halluvit_jax.layers.fused` (``"fused"``;
``"auto"`` picks per platform). The layers act on the last axis: tokens ``[B, N, C]``, NHWC maps
``[B, H, W, C]`` (NextViT's 1x1-conv MLPs) or a `PreNorm`. PVTv2's depthwise conv needs the
token grid: pass ``grid=(H, W)`` for token inputs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from halluvit_jax.layers import fused
from halluvit_jax.layers.common import (
    Activation,
    DenseParams,
    Dtype,
    Initializer,
    dense,
    get_activation,
    timm_trunc_normal,
)
from halluvit_jax.layers.config import FACTORIZE, dispatch
from halluvit_jax.layers.norm import PreNorm, batch_norm_variables, materialize, update_running_stats

# PVTv2 initializes convs with normal(0, sqrt(2 / fan_out)); for a 3x3 depthwise conv fan_out = 9.
_pvt_dwconv_init = nn.initializers.normal(stddev=math.sqrt(2.0 / 9.0))

Hook = Callable[[jax.Array], jax.Array]  # dropout on the hidden layer (plain path only)


def depthwise_conv3x3(p, x: jax.Array, grid: Sequence[int] | None) -> jax.Array:
    """``nn.Conv(c, (3, 3), padding=1, feature_group_count=c)`` on NHWC maps, or on tokens
    ``[B, H*W, C]`` laid out on ``grid``; ``p``: ``kernel`` ``[3, 3, 1, C]``, ``bias``."""
    tokens = x.ndim == 3
    if tokens:
        x = x.reshape(x.shape[0], grid[0], grid[1], x.shape[-1])
    y = jax.lax.conv_general_dilated(
        x, p["kernel"], window_strides=(1, 1), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
    ) + p["bias"]
    return y.reshape(y.shape[0], -1, y.shape[-1]) if tokens else y


def mlp(p, x, grid=None, *, act: Activation, hidden_hook: Hook | None = None) -> jax.Array:
    """``fc2(act([dwconv](fc1(x))))``."""
    h = dense(p["fc1"], materialize(x))
    if "dwconv" in p:
        h = depthwise_conv3x3(p["dwconv"]["conv"], h, grid)
    h = get_activation(act)(h)
    if hidden_hook is not None:
        h = hidden_hook(h)
    return dense(p["fc2"], h)


def rep_dense(v, x, *, train: bool, epsilon: float):
    """`RepDense`: ``(y, batch_mean, batch_var)``; the statistics are None in eval and deploy form.

    Training form (``v`` holds ``branch_kernel`` ``[r, in, out]`` and BatchNorm ``bn``):
    ``y = sum_r BN_r(x @ W_r)``, each branch's BatchNorm over all tokens of the batch in training
    and with its running averages in eval. Deploy form (``kernel``, ``bias``): ``x @ W + b``.
    """
    if "kernel" in v:
        return dense(v, x), None, None
    y = jnp.einsum("...i,rio->...ro", x, v["branch_kernel"])  # the r branches [..., r, out]
    yf = y.astype(jnp.float32)
    if train:
        axes = tuple(range(y.ndim - 2))
        mean = jnp.mean(yf, axis=axes)
        var = jnp.mean(jnp.square(yf - mean), axis=axes)
    else:
        mean, var = v["bn_mean"], v["bn_var"]
    bn = (yf - mean) * jax.lax.rsqrt(var + epsilon) * v["bn"]["scale"] + v["bn"]["bias"]
    out = jnp.sum(bn, axis=-2).astype(y.dtype)
    return (out, mean, var) if train else (out, None, None)


def cffn(v, x, grid=None, *, act: Activation, factorize: str, train: bool, epsilon: float,
         hidden_hook: Hook | None = None):
    """cFFN: ``fc2b(fc2a(act([dwconv](fc1(x)))))`` (W2 factorized, no nonlinearity between the
    factors) or ``fc2(act([dwconv](fc1b(fc1a(x)))))`` (W1). Returns ``(y, stats)`` with the
    batch statistics of every `RepDense` factor in training form and train mode."""
    stats = {}

    def rep(name, h):
        out, mean, var = rep_dense(v[name], h, train=train, epsilon=epsilon)
        if mean is not None:
            stats[name] = (mean, var)
        return out

    x = materialize(x)
    h = rep("fc1b", rep("fc1a", x)) if factorize == "w1" else dense(v["fc1"], x)
    if "dwconv" in v:
        h = depthwise_conv3x3(v["dwconv"]["conv"], h, grid)
    h = get_activation(act)(h)
    if hidden_hook is not None:
        h = hidden_hook(h)
    y = rep("fc2b", rep("fc2a", h)) if factorize == "w2" else dense(v["fc2"], h)
    return y, stats


def compact_width(n_in: int, n_out: int, compact_ratio: float, round_to: int = 1) -> int:
    """Inner width c' of a factorized `n_in x n_out` map: `t * n_in * n_out / (n_in + n_out)`.

    `n_in * n_out / (n_in + n_out)` is the width at which the two factors cost as much as the
    full matrix (for W2 with `n_in = mC, n_out = C` it is docs/design.md's `mC / (m + 1)`). The
    result is rounded half-up to a multiple of `round_to` (at least `round_to`).
    """
    if not 0 < compact_ratio:
        raise ValueError(f"compact_ratio must be positive, got {compact_ratio}.")
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to}.")
    width = compact_ratio * n_in * n_out / (n_in + n_out)
    return max(round_to, int(math.floor(width / round_to + 0.5)) * round_to)


# ----------------------------------------------------------------------------------------------
# Modules


class _DWConvParams(nn.Module):
    """``nn.Conv``'s params of a depthwise 3x3 conv: ``conv/kernel`` ``[3, 3, 1, C]``,
    ``conv/bias``."""

    kernel_init: Initializer = _pvt_dwconv_init
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c: int) -> dict[str, Any]:
        return {"conv": _ConvParams(self.kernel_init, self.param_dtype, name="conv")(c)}


class _ConvParams(nn.Module):
    kernel_init: Initializer
    param_dtype: Dtype

    @nn.compact
    def __call__(self, c: int) -> dict[str, jax.Array]:
        return {"kernel": self.param("kernel", self.kernel_init, (3, 3, 1, c), self.param_dtype),
                "bias": self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)}


def _check_dwconv_grid(x, grid) -> None:
    if x.ndim == 3 and (grid is None or len(grid) != 2 or grid[0] * grid[1] != x.shape[1]):
        raise ValueError(
            f"The depthwise conv needs grid=(H, W) with H * W = {x.shape[1]} tokens, got {grid!r}."
        )


def _promote(module, x, tree):
    """``x`` (array or `PreNorm`) and the weights in ``tree`` in the module's compute dtype
    (BatchNorm variables stay float32: the normalization runs in float32)."""
    dtype = module.dtype or jnp.result_type(x.dtype, module.param_dtype)
    keep = {"bn", "bn_mean", "bn_var"}
    tree = jax.tree_util.tree_map_with_path(
        lambda path, w: w if keep & {getattr(k, "key", None) for k in path} else w.astype(dtype),
        tree)
    if isinstance(x, PreNorm):
        return PreNorm(x.x.astype(dtype), x.scale, x.bias, x.epsilon), tree
    return x.astype(dtype), tree


class DepthwiseConv3x3(nn.Module):
    """3x3 depthwise conv (zero padding 1, bias) on tokens laid out on a grid, or on NHWC maps.

    Params ``conv/kernel`` ``[3, 3, 1, C]`` and ``conv/bias`` (``nn.Conv``'s), PVTv2's init.
    """

    kernel_init: Initializer = _pvt_dwconv_init
    impl: str = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, grid: Sequence[int] | None = None) -> jax.Array:
        _check_dwconv_grid(x, grid)
        p = _ConvParams(self.kernel_init, self.param_dtype, name="conv")(x.shape[-1])
        x, p = _promote(self, x, p)
        grid = None if grid is None else tuple(grid)
        return dispatch(self.impl, functools.partial(depthwise_conv3x3, grid=grid),
                        functools.partial(fused.depthwise_conv3x3, grid=grid), p, x)


class Mlp(nn.Module):
    """Standard FFN: fc1 -> [depthwise 3x3 conv] -> act -> dropout -> fc2 -> dropout.

    Params ``fc1``, ``fc2`` (``nn.Dense``'s) and, with ``use_dwconv``, ``dwconv/conv``.
    """

    hidden_features: int
    out_features: int | None = None
    act: Activation = "gelu"
    use_dwconv: bool = False
    drop: float = 0.0
    use_bias: bool = True
    kernel_init: Initializer = timm_trunc_normal
    impl: str = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array | PreNorm, grid: Sequence[int] | None = None, *,
                 train: bool = False) -> jax.Array:
        c, hidden = x.shape[-1], self.hidden_features
        p = {"fc1": DenseParams(hidden, self.use_bias, self.kernel_init, self.param_dtype,
                                name="fc1")(c)}
        if self.use_dwconv:
            _check_dwconv_grid(x, grid)
            p["dwconv"] = _DWConvParams(param_dtype=self.param_dtype, name="dwconv")(hidden)
        p["fc2"] = DenseParams(self.out_features or c, self.use_bias, self.kernel_init,
                               self.param_dtype, name="fc2")(hidden)
        x, p = _promote(self, x, p)
        grid = None if grid is None else tuple(grid)
        drop = nn.Dropout(self.drop)
        if train and self.drop > 0:  # dropout on the hidden layer: the plain path
            y = mlp(p, x, grid, act=self.act, hidden_hook=lambda h: drop(h, deterministic=False))
        else:
            y = dispatch(self.impl, functools.partial(mlp, grid=grid, act=self.act),
                         functools.partial(fused.mlp, grid=grid, act=self.act), p, x)
        return drop(y, deterministic=not train)


class _BatchNormVariables(nn.Module):
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, shape: tuple[int, ...]):
        return batch_norm_variables(self, shape, self.param_dtype)


def _rep_dense_variables(module: nn.Module, cin: int, features: int, num_branches: int,
                         deploy: bool, momentum: float, kernel_init: Initializer, param_dtype: Dtype):
    """Create a `RepDense`'s variables on ``module`` and return them as the dict `rep_dense`
    reads, with a function updating the running averages (None in deploy form).

    Deploy form: ``kernel``/``bias``. Training form: ``branch_kernel`` ``[r, in, out]`` and
    ``bn`` (``nn.BatchNorm``'s variables over ``(r, out)``), whose running averages the dict
    holds as ``bn_mean``/``bn_var``.
    """
    if deploy:
        kernel = module.param("kernel", kernel_init, (cin, features), param_dtype)
        bias = module.param("bias", nn.initializers.zeros, (features,), param_dtype)
        return {"kernel": kernel, "bias": bias}, None
    kernel = module.param("branch_kernel", kernel_init, (num_branches, cin, features), param_dtype)
    bn = _BatchNormVariables(param_dtype, name="bn")
    scale, bias, ra_mean, ra_var = bn((num_branches, features))
    v = {"branch_kernel": kernel, "bn": {"scale": scale, "bias": bias},
         "bn_mean": ra_mean.value, "bn_var": ra_var.value}
    return v, lambda mean, var: update_running_stats(bn, ra_mean, ra_var, mean, var, momentum)


class _RepDenseVariables(nn.Module):
    """A `CompactMlp` factor's variables (see `_rep_dense_variables`), under the factor's name."""

    features: int
    num_branches: int
    deploy: bool
    momentum: float
    kernel_init: Initializer
    param_dtype: Dtype

    @nn.compact
    def __call__(self, cin: int):
        return _rep_dense_variables(self, cin, self.features, self.num_branches, self.deploy,
                                    self.momentum, self.kernel_init, self.param_dtype)


class RepDense(nn.Module):
    """A linear map trained as ``r`` parallel (bias-free Dense -> BatchNorm) branches, summed
    (`rep_dense`); ``deploy=True`` builds the folded form, one Dense with bias, which
    `halluvit_jax.reparameterize` produces from the training form.

    Training-form variables: ``branch_kernel`` ``[r, in, out]``, ``bn`` with ``nn.BatchNorm``'s
    variables over ``(r, out)`` (running averages updated as flax's BatchNorm does). Each
    branch's BatchNorm takes its statistics over all leading axes (all tokens of the batch).
    """

    features: int
    num_branches: int = 2
    deploy: bool = False
    bn_momentum: float = 0.9  # PyTorch momentum 0.1
    bn_epsilon: float = 1e-5
    kernel_init: Initializer = timm_trunc_normal
    impl: str = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if self.num_branches < 1:
            raise ValueError(f"RepDense needs num_branches >= 1, got {self.num_branches}.")
        v, update = _rep_dense_variables(self, x.shape[-1], self.features, self.num_branches,
                                         self.deploy, self.bn_momentum, self.kernel_init,
                                         self.param_dtype)
        x, v = _promote(self, x, v)
        train = train and not self.deploy
        plain = functools.partial(rep_dense, train=train, epsilon=self.bn_epsilon)
        fused_ = functools.partial(fused.rep_dense, train=train, epsilon=self.bn_epsilon)
        y, mean, var = dispatch(self.impl, plain, fused_, v, x)
        if mean is not None:
            update(mean, var)
        return y


class CompactMlp(nn.Module):
    """cFFN (docs/design.md section 3): an FFN with one of its two matrices factorized.

    ``factorize="w2"`` (default): ``fc1 -> [dwconv] -> act -> fc2a (mC -> c') -> fc2b (c' -> C)``,
    no nonlinearity between the factors. ``factorize="w1"``: ``fc1a (C -> c') -> fc1b (c' -> mC)
    -> [dwconv] -> act -> fc2``. Each factor is a `RepDense` with ``num_branches`` training-time
    branches (folded with ``deploy=True``); ``c' = compact_width(...)``.
    """

    hidden_features: int
    out_features: int | None = None
    compact_ratio: float = 2.0 / 3.0
    round_to: int = 1
    num_branches: int = 2
    factorize: str = "w2"
    deploy: bool = False
    act: Activation = "gelu"
    use_dwconv: bool = False
    drop: float = 0.0
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    kernel_init: Initializer = timm_trunc_normal
    impl: str = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array | PreNorm, grid: Sequence[int] | None = None, *,
                 train: bool = False) -> jax.Array:
        if self.factorize not in FACTORIZE:
            raise ValueError(f"factorize must be one of {FACTORIZE}, got {self.factorize!r}.")
        if self.num_branches < 1:
            raise ValueError(f"CompactMlp needs num_branches >= 1, got {self.num_branches}.")
        cin, hidden = x.shape[-1], self.hidden_features
        cout = self.out_features or cin
        rep = lambda f, name, n_in: _RepDenseVariables(  # noqa: E731
            f, self.num_branches, self.deploy, self.bn_momentum, self.kernel_init,
            self.param_dtype, name=name)(n_in)
        v, updates = {}, {}
        if self.factorize == "w1":
            width = compact_width(cin, hidden, self.compact_ratio, self.round_to)
            v["fc1a"], updates["fc1a"] = rep(width, "fc1a", cin)
            v["fc1b"], updates["fc1b"] = rep(hidden, "fc1b", width)
        else:
            v["fc1"] = DenseParams(hidden, True, self.kernel_init, self.param_dtype, name="fc1")(cin)
        if self.use_dwconv:
            _check_dwconv_grid(x, grid)
            v["dwconv"] = _DWConvParams(param_dtype=self.param_dtype, name="dwconv")(hidden)
        if self.factorize == "w2":
            width = compact_width(hidden, cout, self.compact_ratio, self.round_to)
            v["fc2a"], updates["fc2a"] = rep(width, "fc2a", hidden)
            v["fc2b"], updates["fc2b"] = rep(cout, "fc2b", width)
        else:
            v["fc2"] = DenseParams(cout, True, self.kernel_init, self.param_dtype, name="fc2")(hidden)
        x, v = _promote(self, x, v)
        kwargs = dict(grid=None if grid is None else tuple(grid), act=self.act,
                      factorize=self.factorize, train=train and not self.deploy,
                      epsilon=self.bn_epsilon)
        drop = nn.Dropout(self.drop)
        if train and self.drop > 0:  # dropout on the hidden layer: the plain path
            y, stats = cffn(v, x, **kwargs, hidden_hook=lambda h: drop(h, deterministic=False))
        else:
            y, stats = dispatch(self.impl, functools.partial(cffn, **kwargs),
                                functools.partial(fused.cffn, **kwargs), v, x)
        for name, (mean, var) in stats.items():
            updates[name](mean, var)
        return drop(y, deterministic=not train)
