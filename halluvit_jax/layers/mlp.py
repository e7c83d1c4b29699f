"""Feed-forward networks: the standard `Mlp` and the compact `CompactMlp` (cFFN).

Both act on the last axis, so they take tokens `[B, N, C]` or NHWC maps `[B, H, W, C]`
(NextViT's 1x1-conv MLPs), or a `PreNorm` (a deferred LayerNorm, fused into `fc1` where the
layer allows it). The optional depthwise 3x3 conv after `fc1` (PVTv2) needs the
token grid: pass `grid=(H, W)` for token inputs.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from halluvit_jax.layers.common import (
    Dtype,
    Initializer,
    PreNorm,
    SplitDense,
    after,
    batch_norm_grads,
    batch_norm_variables,
    batch_normalize,
    batch_statistics,
    dense_act_dense,
    get_activation,
    materialize,
    split_prenorm,
    timm_trunc_normal,
    update_running_stats,
)
from halluvit_jax.layers.conv import depthwise_conv

# Named scope of the depthwise 3x3 conv of PVTv2's FFN, written as shifted multiply-adds: the
# complexity counter counts each `mul` inside it as one MAC per output element.
DWCONV_SCOPE = "depthwise_conv3x3"

# PVTv2 initializes convs with normal(0, sqrt(2 / fan_out)); for a 3x3 depthwise conv fan_out = 9.
_pvt_dwconv_init = nn.initializers.normal(stddev=math.sqrt(2.0 / 9.0))


class _ShiftedDepthwiseConv(nn.Module):
    """``nn.Conv(c, (3, 3), padding=1, feature_group_count=c)`` (same params: ``kernel``
    ``[3, 3, 1, c]``, ``bias`` ``[c]``) computed by `halluvit_jax.layers.conv.depthwise_conv`.

    XLA's CPU grouped convolution is an order of magnitude slower than those fused shifted
    multiply-adds, and their custom VJP keeps only the input for the backward pass (plain
    autodiff kept nine shifted copies of the widest PVTv2 map). The conv runs in the named scope
    ``DWCONV_SCOPE``, whose multiplies ``halluvit_jax.complexity`` counts as MACs (9 per output
    element, as for the conv); the bias add is outside it.
    """

    kernel_init: Initializer
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (3, 3, 1, c), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        with jax.named_scope(DWCONV_SCOPE):
            out = depthwise_conv(x, kernel.reshape(3, 3, 1, 1, 1, c), axes=(1, 2),
                                 batch_loop=x.shape[0] > 1)
        return out + bias


class DepthwiseConv3x3(nn.Module):
    """3x3 depthwise conv (zero padding 1) on tokens laid out on a grid, or on NHWC maps."""

    kernel_init: Initializer = _pvt_dwconv_init
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, grid: Sequence[int] | None = None) -> jax.Array:
        tokens = x.ndim == 3
        if tokens:
            if grid is None or grid[0] * grid[1] != x.shape[1]:
                raise ValueError(
                    f"The depthwise conv needs grid=(H, W) with H * W = {x.shape[1]} tokens, got {grid!r}."
                )
            x = x.reshape(x.shape[0], grid[0], grid[1], x.shape[-1])
        c = x.shape[-1]
        y = _ShiftedDepthwiseConv(self.kernel_init, self.dtype, self.param_dtype, name="conv")(x)
        return y.reshape(y.shape[0], -1, c) if tokens else y


class _DenseParams(nn.Module):
    """The params of ``nn.Dense(features)`` (``kernel`` ``[in, features]``, ``bias``: same names,
    shapes and init), returned for a fused op to use."""

    features: int
    kernel_init: Initializer
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        return kernel, bias


class Mlp(nn.Module):
    """Standard FFN: fc1 -> [depthwise conv] -> act -> dropout -> fc2 -> dropout."""

    hidden_features: int
    out_features: int | None = None
    act: str | Callable[[jax.Array], jax.Array] = "gelu"
    use_dwconv: bool = False
    drop: float = 0.0
    use_bias: bool = True
    kernel_init: Initializer = timm_trunc_normal
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array | PreNorm, grid: Sequence[int] | None = None, *,
                 train: bool = False):
        dense = lambda f, name: nn.Dense(  # noqa: E731
            f, use_bias=self.use_bias, kernel_init=self.kernel_init, dtype=self.dtype,
            param_dtype=self.param_dtype, name=name,
        )
        out_features = self.out_features or x.shape[-1]
        if not self.use_dwconv and self.use_bias and (self.drop == 0 or not train):
            # One custom-VJP op with the same params (fc1/fc2 kernel and bias): its backward
            # pass recomputes the activation instead of keeping the hidden output alive.
            k1, b1 = _DenseParams(self.hidden_features, self.kernel_init, self.param_dtype,
                                  name="fc1")(x.shape[-1])
            k2, b2 = _DenseParams(out_features, self.kernel_init, self.param_dtype,
                                  name="fc2")(self.hidden_features)
            x, norm, eps = split_prenorm(x)
            x, k1, b1, k2, b2 = nn.dtypes.promote_dtype(x, k1, b1, k2, b2, dtype=self.dtype)
            return dense_act_dense(x, k1, b1, k2, b2, get_activation(self.act), norm, eps)
        x = dense(self.hidden_features, "fc1")(materialize(x))
        if self.use_dwconv:
            x = DepthwiseConv3x3(dtype=self.dtype, param_dtype=self.param_dtype, name="dwconv")(x, grid)
        x = get_activation(self.act)(x)
        x = nn.Dropout(self.drop)(x, deterministic=not train)
        x = dense(out_features, "fc2")(x)
        return nn.Dropout(self.drop)(x, deterministic=not train)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def rep_dense_bn(x, kernel, scale, bias, act, epsilon):
    """``sum_r BN_r(act(x) @ kernel[r])``: the training form of `RepDense` in train mode.

    ``kernel`` ``[r, in, out]``; BatchNorm ``scale``/``bias`` ``[r, out]``, statistics over all
    leading axes of ``x`` per (branch, feature), in float32. ``act`` (static) is None or a
    function applied to ``x`` first (the cFFN's activation before ``fc2a``). Returns
    ``(out, mean, var)``, the batch statistics for the running averages; they are treated as
    constants (no gradient flows back through them, as under ``stop_gradient``).

    Custom VJP: the backward pass keeps ``x`` and the branch outputs ``[..., r, out]``, and
    rebuilds ``act(x)`` and the normalized branches; autodiff of ``act`` -> Dense -> flax
    BatchNorm keeps ``act(x)`` and two branch-sized tensors besides.
    """
    return _rep_dense_bn_fwd(x, kernel, scale, bias, act, epsilon)[0]


def _rep_dense_bn_fwd(x, kernel, scale, bias, act, epsilon):
    a = x if act is None else act(x)
    y = jnp.einsum("...i,rio->...ro", a, kernel)
    mean, var = batch_statistics(y, tuple(range(y.ndim - 2)))
    rstd = jax.lax.rsqrt(var + epsilon)
    out = jnp.sum(batch_normalize(y, mean, rstd, scale, bias), axis=-2)
    return (out.astype(y.dtype), mean, var), (x, y, mean, rstd, scale, kernel)


def _rep_dense_bn_bwd(act, epsilon, res, cotangents):
    x, y, mean, rstd, scale, kernel = res
    g = cotangents[0]  # the statistics' cotangents are dropped: see the docstring
    # Tied to g so that the rebuilt tensors are computed here (see common.after()).
    x, y, mean, rstd, scale = (after(t, g) for t in (x, y, mean, rstd, scale))
    xhat = (y.astype(jnp.float32) - mean) * rstd
    dy, dscale, dbias = batch_norm_grads(xhat, rstd, scale, g.astype(jnp.float32)[..., None, :],
                                         tuple(range(y.ndim - 2)), math.prod(y.shape[:-2]))
    dbias = jnp.broadcast_to(dbias, mean.shape)  # every branch's bias sees the same gradient
    a, act_vjp = (x, None) if act is None else jax.vjp(act, x)
    # Both matmuls as 2-D ones with the branch outputs [M, r * out] as they lie: written as
    # einsums over (r, out), XLA's CPU dot first transposed the token-sized dy (~3x slower).
    r, cin, cout = kernel.shape
    dy = dy.astype(y.dtype).reshape(-1, r * cout)
    a = a.reshape(-1, cin)
    dkernel = (a.T @ dy).reshape(cin, r, cout).transpose(1, 0, 2)
    da = (dy @ kernel.transpose(1, 0, 2).reshape(cin, r * cout).T).reshape(x.shape)
    dx = da if act_vjp is None else act_vjp(da)[0]
    return dx, dkernel, dscale.astype(scale.dtype), dbias.astype(scale.dtype)


rep_dense_bn.defvjp(_rep_dense_bn_fwd, _rep_dense_bn_bwd)


class _BatchNormVariables(nn.Module):
    """The variables of ``nn.BatchNorm`` over features of shape ``shape``, for a fused op."""

    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, shape: tuple[int, ...]):
        return batch_norm_variables(self, shape, self.param_dtype)


class RepDense(nn.Module):
    """A linear map trained as `r` parallel (bias-free Dense -> BatchNorm) branches, summed.

    Training form: params `branch_kernel` `[r, in, out]` and BatchNorm `bn` with scale/bias
    `[r, out]` (batch_stats mean/var `[r, out]`; the variables of ``nn.BatchNorm``). The r
    branches run as one matmul and their BatchNorms as one BatchNorm over `(r, out)` features,
    which is exactly r independent per-branch BatchNorms (statistics over all leading axes, i.e.
    all tokens of the batch; running averages as flax's BatchNorm updates them). In train mode
    this is one custom-VJP op, `rep_dense_bn`.

    Deploy form (`deploy=True`): params `kernel` `[in, out]` and `bias` `[out]`, what
    `halluvit_jax.reparameterize` produces from the training form.

    `__call__(x, train, act)`: ``act`` (optional) is applied to ``x`` first; in train mode it is
    fused into the op and recomputed in its backward pass.
    """

    features: int
    num_branches: int = 2
    deploy: bool = False
    bn_momentum: float = 0.9  # PyTorch momentum 0.1
    bn_epsilon: float = 1e-5
    kernel_init: Initializer = timm_trunc_normal
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False,
                 act: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
        if self.num_branches < 1:
            raise ValueError(f"RepDense needs num_branches >= 1, got {self.num_branches}.")
        cin = x.shape[-1]
        if self.deploy:
            kernel = self.param("kernel", self.kernel_init, (cin, self.features), self.param_dtype)
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
            return jnp.dot(x if act is None else act(x), kernel) + bias
        kernel = self.param(
            "branch_kernel", self.kernel_init, (self.num_branches, cin, self.features), self.param_dtype
        )
        shape = (self.num_branches, self.features)
        scale, bias, ra_mean, ra_var = _BatchNormVariables(self.param_dtype, name="bn")(shape)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        if not train:  # running statistics: flax BatchNorm's normalization
            y = jnp.einsum("...i,rio->...ro", x if act is None else act(x), kernel)
            rstd = jax.lax.rsqrt(ra_var.value + self.bn_epsilon)
            return batch_normalize(y, ra_mean.value, rstd, scale, bias).astype(x.dtype).sum(axis=-2)
        out, mean, var = rep_dense_bn(x, kernel, scale, bias, act, self.bn_epsilon)
        update_running_stats(self, ra_mean, ra_var, mean, var, self.bn_momentum)
        return out


def compact_width(n_in: int, n_out: int, compact_ratio: float, round_to: int = 1) -> int:
    """Inner width c' of a factorized `n_in x n_out` map: `t * n_in * n_out / (n_in + n_out)`.

    `n_in * n_out / (n_in + n_out)` is the width at which the two factors cost as much as the
    full matrix (for W2 with `n_in = mC, n_out = C` it is DESIGN.md's `mC / (m + 1)`). The
    result is rounded half-up to a multiple of `round_to` (at least `round_to`).
    """
    if not 0 < compact_ratio:
        raise ValueError(f"compact_ratio must be positive, got {compact_ratio}.")
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to}.")
    width = compact_ratio * n_in * n_out / (n_in + n_out)
    return max(round_to, int(math.floor(width / round_to + 0.5)) * round_to)


class CompactMlp(nn.Module):
    """cFFN (DESIGN.md section 3): an FFN with one of its two matrices factorized.

    `factorize="w2"` (default): `fc1 -> [dwconv] -> act -> fc2a (mC -> c') -> fc2b (c' -> C)`,
    no nonlinearity between the factors. `factorize="w1"`: `fc1a (C -> c') -> fc1b (c' -> mC)
    -> [dwconv] -> act -> fc2`. Each factor is a `RepDense` with `num_branches` training-time
    branches; `deploy=True` builds them folded (one Dense with bias each).
    `c' = compact_width(...)`, i.e. `round(t * mC * C / (mC + C))` for W2.
    """

    hidden_features: int
    out_features: int | None = None
    compact_ratio: float = 2.0 / 3.0
    round_to: int = 1
    num_branches: int = 2
    factorize: str = "w2"
    deploy: bool = False
    act: str | Callable[[jax.Array], jax.Array] = "gelu"
    use_dwconv: bool = False
    drop: float = 0.0
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    kernel_init: Initializer = timm_trunc_normal
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def _rep(self, features: int, name: str) -> RepDense:
        return RepDense(
            features,
            num_branches=self.num_branches,
            deploy=self.deploy,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    @nn.compact
    def __call__(self, x: jax.Array | PreNorm, grid: Sequence[int] | None = None, *,
                 train: bool = False):
        if self.factorize not in ("w1", "w2"):
            raise ValueError(f"factorize must be 'w1' or 'w2', got {self.factorize!r}.")
        cin = x.shape[-1]
        cout = self.out_features or cin
        hidden = self.hidden_features
        if self.factorize == "w1":
            width = compact_width(cin, hidden, self.compact_ratio, self.round_to)
            x = self._rep(width, "fc1a")(materialize(x), train=train)
            x = self._rep(hidden, "fc1b")(x, train=train)
        else:  # nn.Dense's params and init; fuses a PreNorm
            (x,) = SplitDense((hidden,), kernel_init=self.kernel_init, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="fc1")(x)
        if self.use_dwconv:
            x = DepthwiseConv3x3(dtype=self.dtype, param_dtype=self.param_dtype, name="dwconv")(x, grid)
        act = get_activation(self.act)
        # Without dropout in between, the activation goes into fc2a's fused op (rebuilt in its
        # backward pass instead of kept).
        fuse_act = self.factorize == "w2" and (self.drop == 0 or not train)
        if not fuse_act:
            x = nn.Dropout(self.drop)(act(x), deterministic=not train)
        if self.factorize == "w2":
            width = compact_width(hidden, cout, self.compact_ratio, self.round_to)
            x = self._rep(width, "fc2a")(x, train=train, act=act if fuse_act else None)
            x = self._rep(cout, "fc2b")(x, train=train)
        else:
            x = nn.Dense(cout, kernel_init=self.kernel_init, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="fc2")(x)
        return nn.Dropout(self.drop)(x, deterministic=not train)
