"""Feed-forward networks: the standard `Mlp` and the compact `CompactMlp` (cFFN,
docs/design.md section 3), with `RepDense` (a linear map trained as parallel Dense ->
BatchNorm branches) and the depthwise 3x3 conv of PVTv2's FFN.

`mlp`, `rep_dense` and `cffn` below are the forward passes; the modules create the parameters
and run them (``impl="plain"``), the CPU kernels of `halluvit_jax.layers.fused` (``"fused"``) or,
for the cFFN's factors, `rep_dense_accel`, the same math laid out to move fewer bytes on TPU and
GPU (``"accel"``), or, for the cFFN in training, Pallas kernels (``"pallas"``,
`halluvit_jax.layers.kernels.cffn_pallas`); ``"auto"`` picks per platform. The layers act on
the last axis: tokens ``[B, N, C]``, NHWC maps
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

from halluvit_jax.layers import axes, fused
from halluvit_jax.layers.common import (
    Activation,
    DenseParams,
    Dtype,
    Initializer,
    PreNorm,
    dense,
    get_activation,
    grouped_conv3x3,
    promote,
    timm_trunc_normal,
)
from halluvit_jax.layers.config import FACTORIZE, run
from halluvit_jax.layers.kernels import cffn_pallas as cffn_kernels
from halluvit_jax.layers.norm import (
    batch_norm_variables,
    branch_affine,
    branch_stats,
    materialize,
    update_running_stats,
)

# PVTv2 initializes convs with normal(0, sqrt(2 / fan_out)); for a 3x3 depthwise conv fan_out = 9.
_pvt_dwconv_init = nn.initializers.normal(stddev=math.sqrt(2.0 / 9.0))

Hook = Callable[[jax.Array], jax.Array]  # dropout on the hidden layer (plain path only)


def depthwise_conv3x3(p, x: jax.Array, grid: Sequence[int] | None) -> jax.Array:
    """``nn.Conv(c, (3, 3), padding=1, feature_group_count=c)`` on NHWC maps, or on tokens
    ``[B, H*W, C]`` laid out on ``grid``; ``p``: ``kernel`` ``[3, 3, 1, C]``, ``bias``. Through
    `grouped_conv3x3`, whose kernel gradient is right on a ``model`` mesh where the hidden width
    does not divide by the axis (the maps then stay whole on every model shard)."""
    tokens = x.ndim == 3
    if tokens:
        x = x.reshape(x.shape[0], grid[0], grid[1], x.shape[-1])
    y = grouped_conv3x3(x, p["kernel"], x.shape[-1]) + p["bias"]
    return y.reshape(y.shape[0], -1, y.shape[-1]) if tokens else y


def _on_grid(x: jax.Array, p, grid: Sequence[int] | None) -> tuple[jax.Array, tuple[int, ...] | None]:
    """Tokens ``[B, H*W, C]`` of an FFN with a dwconv as the map ``[B, H, W, C]``, and the shape
    to give the output back (None: ``x`` as it was). The whole FFN then runs on the map, not
    only its dwconv: the same math (a Dense layer acts on the last axis either way), and the
    ONNX export sees its Dense layers as the 1x1 convolutions around the 3x3 one
    (``onnx_fusions.pointwise_as_conv``), which onnxruntime runs in one conv layout."""
    if "dwconv" not in p or x.ndim != 3:
        return x, None
    _check_dwconv_grid(x, grid)
    return x.reshape(x.shape[0], grid[0], grid[1], x.shape[-1]), x.shape[:-1]


def mlp(p, x, grid=None, *, act: Activation, hook: Hook | None = None) -> jax.Array:
    """``fc2(act([dwconv](fc1(x))))``."""
    x, tokens = _on_grid(materialize(x), p, grid)
    h = dense(p["fc1"], x)
    if "dwconv" in p:
        h = depthwise_conv3x3(p["dwconv"]["conv"], h, grid)
    h = get_activation(act)(h)
    if hook is not None:
        h = hook(h)
    y = dense(p["fc2"], h)
    return y if tokens is None else y.reshape(*tokens, y.shape[-1])


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


@jax.custom_vjp
def _gram(x: jax.Array) -> jax.Array:
    """``x^T x`` ``[n, n]`` over all leading axes of ``x`` ``[..., n]`` (not reshaped to rows:
    that costs NHWC maps a relayout), accumulated in float32. Its backward multiplies ``x`` by
    the cotangent cast to ``x``'s dtype: autodiff's would promote ``x`` to float32, and XLA
    writes that copy (transposed) to memory."""
    return jnp.einsum("...i,...j->ij", x, x, preferred_element_type=jnp.float32)


def _gram_fwd(x):
    return _gram(x), x


def _gram_bwd(x, ct):
    sym = (ct + ct.T).astype(x.dtype)
    return (jnp.einsum("...i,ij->...j", x, sym, preferred_element_type=jnp.float32).astype(x.dtype),)


_gram.defvjp(_gram_fwd, _gram_bwd)


def rep_dense_accel(v, x, *, train: bool, epsilon: float):
    """`rep_dense` laid out for accelerators (``impl="accel"``): the same values and gradients
    with fewer passes over memory. Each branch's BatchNorm is affine per output feature, so the
    branches sum to one linear map ``x @ W_eff + b`` (`branch_affine`); the statistics come from:

    - eval mode: the running averages (one matmul, as in the deploy form);
    - train mode, a narrow input (``in <= (r - 1) * out``, where this costs fewer MACs than the
      branches: the cFFN's ``fc2b``, ``c' -> C``): the input's mean ``mu`` and Gram matrix, by
      the identities ``mean_r = mu @ W_r`` and ``var_r = diag(W_r^T Cov(x) W_r)`` with
      ``Cov(x) = x^T x / M - mu mu^T``. The ``[..., r, out]`` branch outputs never exist;
    - train mode otherwise (``fc2a``, ``mC -> c'``): the branches as one matmul, both statistics
      from one pass over it (``E[y^2] - E[y]^2``, as flax's BatchNorm computes its variance by
      default) and the normalization folded into the sum of the branches.

    The one-pass statistics lose float32 precision when a feature's mean is far larger than its
    spread (beyond about 1e3 times); the plain path (two passes) is the reference.
    """
    if "kernel" in v:
        return dense(v, x), None, None
    w = v["branch_kernel"]
    r, n_in, n_out = w.shape
    if train and n_in > (r - 1) * n_out:  # the branches, normalized as they are summed
        y = jnp.einsum("...i,rio->...ro", x, w)  # [..., r, out]
        axes_ = tuple(range(y.ndim - 2))
        mean = jnp.mean(y, axis=axes_, dtype=jnp.float32)
        var = jnp.maximum(jnp.mean(jnp.square(y.astype(jnp.float32)), axis=axes_) - jnp.square(mean),
                          0.0)
        s, bias = branch_affine(v["bn"], mean, var, epsilon)
        return jnp.einsum("...ro,ro->...o", y, s.astype(x.dtype)) + bias.astype(x.dtype), mean, var
    wf = w.astype(jnp.float32)
    if train:  # from the input's mean and Gram matrix
        lead = tuple(range(x.ndim - 1))
        mu = jnp.mean(x, axis=lead, dtype=jnp.float32)
        cov = _gram(x) / (x.size // n_in) - mu[:, None] * mu[None, :]
        mean, var = branch_stats(mu, cov, wf)
    else:  # the running averages
        mean, var = v["bn_mean"], v["bn_var"]
    s, bias = branch_affine(v["bn"], mean, var, epsilon)
    kernel = jnp.einsum("rio,ro->io", wf, s).astype(x.dtype)  # the branches folded into one map
    out = jnp.dot(x, kernel) + bias.astype(x.dtype)
    return (out, mean, var) if train else (out, None, None)


def cffn(v, x, grid=None, *, act: Activation, factorize: str, train: bool, epsilon: float,
         hook: Hook | None = None, accel: bool = False):
    """cFFN: ``fc2b(fc2a(act([dwconv](fc1(x)))))`` (W2 factorized, no nonlinearity between the
    factors) or ``fc2(act([dwconv](fc1b(fc1a(x)))))`` (W1). Returns ``(y, stats)`` with the
    batch statistics of every `RepDense` factor in training form and train mode. ``accel``: the
    factors as `rep_dense_accel` computes them."""
    stats = {}
    factor = rep_dense_accel if accel else rep_dense

    def rep(name, h):
        out, mean, var = factor(v[name], h, train=train, epsilon=epsilon)
        if mean is not None:
            stats[name] = (mean, var)
        return out

    x, tokens = _on_grid(materialize(x), v, grid)
    h = rep("fc1b", rep("fc1a", x)) if factorize == "w1" else dense(v["fc1"], x)
    if "dwconv" in v:
        h = depthwise_conv3x3(v["dwconv"]["conv"], h, grid)
    h = get_activation(act)(h)
    if hook is not None:
        h = hook(h)
    y = rep("fc2b", rep("fc2a", h)) if factorize == "w2" else dense(v["fc2"], h)
    return (y if tokens is None else y.reshape(*tokens, y.shape[-1])), stats


def _pallas_applies(v, x, grid, *, factorize: str, train: bool) -> bool:
    """Whether `cffn_pallas` runs its kernels: the ``w2`` factorization in training form and
    train mode, with blocks that fit `cffn_pallas.VMEM_BUDGET`, on

    - tokens ``[B, N, C]`` (DeiT's, PVTv2's): the kernels read the batch next to the features;
    - NHWC maps ``[B, H, W, C]`` (NextViT's): the kernels read the batch on the lanes, so each
      batch shard must be a multiple of `cffn_pallas.LANES` images, and hold at least
      `cffn_pallas.MIN_ROWS_PER_HIDDEN` times the hidden width in rows (map positions x images):
      NextViT-S's 7x7 stage at 128 images per chip has 2.7 and runs the accel form, where the
      kernels' weight-sized passes cost more than they save (docs/aot.md)."""
    if not (train and factorize == "w2" and "branch_kernel" in v["fc2a"] and x.ndim in (3, 4)):
        return False
    r, hidden, width = v["fc2a"]["branch_kernel"].shape
    cout = v["fc2b"]["branch_kernel"].shape[-1]
    itemsize = jnp.dtype(x.dtype).itemsize
    if x.ndim == 4:
        if "dwconv" in v:
            return False
        shards = axes.batch_shards()
        batch = x.shape[0] // shards
        rows = batch * x.shape[1] * x.shape[2]
        return (x.shape[0] % shards == 0 and batch % cffn_kernels.LANES == 0
                and rows >= cffn_kernels.MIN_ROWS_PER_HIDDEN * hidden
                and cffn_kernels.fits_lanes((batch, *x.shape[1:3], hidden), r * width, cout, x.shape[-1], itemsize))
    lead, cin = x.shape[:-1], x.shape[-1]  # fc1 inside the kernels
    if "dwconv" in v and grid is not None:  # `_on_grid`: the FFN runs on the map, the kernels after fc1
        lead, cin = (x.shape[0], *grid), 0
    return cffn_kernels.fits((*lead, hidden), r * width, cout, itemsize, cin)


def _cffn_kernels(v, x, grid=None, *, act: Activation, factorize: str, train: bool, epsilon: float,
                  hook: Hook | None = None, interpret: bool = False):
    """`cffn` through `cffn_pallas`'s kernels: fc1 and ``fc2a -> fc2b`` (`compact_ffn`), or,
    with a depthwise conv after fc1, ``fc2a -> fc2b`` alone (`compact_output`)."""
    del factorize, train, hook  # `_pallas_applies` checked them; a hook runs the plain path
    x, tokens = _on_grid(materialize(x), v, grid)
    kw = dict(act=get_activation(act), epsilon=epsilon, interpret=interpret)
    if "dwconv" in v:  # fc1 -> dwconv -> kernels
        h = depthwise_conv3x3(v["dwconv"]["conv"], dense(v["fc1"], x), grid)
        y, (mean_a, var_a, mean_b, var_b) = cffn_kernels.compact_output(h, v["fc2a"], v["fc2b"], **kw)
    else:  # fc1 in the kernels
        y, (mean_a, var_a, mean_b, var_b) = cffn_kernels.compact_ffn(x, v["fc1"], v["fc2a"], v["fc2b"], **kw)
    stats = {"fc2a": (mean_a, var_a), "fc2b": (mean_b, var_b)}
    return (y if tokens is None else y.reshape(*tokens, y.shape[-1])), stats


def cffn_pallas(v, x, grid=None, **kwargs):
    """``impl="pallas"`` for the cFFN: in training form and train mode (``w2``), as Pallas
    kernels (`cffn_pallas`: fc1 and the compact output map, or, with PVTv2's depthwise conv
    between them, the output map alone; on NHWC maps the kernels that read the batch on the
    lanes): Mosaic on TPU, the same kernels in Pallas' interpreter on CPU (for tests). On other
    platforms, where `_pallas_applies` declines (maps of too few rows or a batch shard narrower
    than the lanes, blocks over the VMEM budget), and in eval, deploy or ``w1`` form, the accel
    path (`cffn` with ``accel=True``). On a mesh of several devices the kernels run per batch
    shard."""
    accel = functools.partial(cffn, accel=True, **kwargs)
    if not _pallas_applies(v, x, grid, factorize=kwargs["factorize"], train=kwargs["train"]):
        return accel(v, x, grid)
    kernels = functools.partial(_cffn_kernels, grid=grid, **kwargs)
    return jax.lax.platform_dependent(v, x, tpu=kernels, cpu=functools.partial(kernels, interpret=True),
                                      default=functools.partial(accel, grid=grid))


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


class _ConvParams(nn.Module):
    """``nn.Conv``'s params of a depthwise 3x3 conv over ``c`` channels (``kernel``
    ``[3, 3, 1, C]``, ``bias``); ``names``: the channels' logical axis."""

    kernel_init: Initializer = _pvt_dwconv_init
    param_dtype: Dtype = jnp.float32
    names: str | None = None

    @nn.compact
    def __call__(self, c: int) -> dict[str, jax.Array]:
        dt = self.param_dtype
        return {"kernel": axes.param(self, "kernel", self.kernel_init, (3, 3, 1, c), dt,
                                     (None, None, None, self.names)),
                "bias": axes.param(self, "bias", nn.initializers.zeros, (c,), dt, (self.names,))}


class _DWConvParams(nn.Module):
    """An FFN's depthwise conv params, ``conv/kernel`` and ``conv/bias`` (``nn.Conv``'s)."""

    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c: int) -> dict[str, Any]:
        return {"conv": _ConvParams(param_dtype=self.param_dtype, names="mlp", name="conv")(c)}


def _check_dwconv_grid(x, grid) -> None:
    if x.ndim == 3 and (grid is None or len(grid) != 2 or grid[0] * grid[1] != x.shape[1]):
        raise ValueError(
            f"The depthwise conv needs grid=(H, W) with H * W = {x.shape[1]} tokens, got {grid!r}."
        )


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
        x, p = promote(self, x, p)
        grid = None if grid is None else tuple(grid)
        return run(self.impl, functools.partial(depthwise_conv3x3, grid=grid),
                   functools.partial(fused.depthwise_conv3x3, grid=grid), p, x)


class _BatchNormVariables(nn.Module):
    param_dtype: Dtype = jnp.float32
    names: tuple[str | None, ...] = (None,)

    @nn.compact
    def __call__(self, shape: tuple[int, ...]):
        return batch_norm_variables(self, shape, self.param_dtype, self.names)


def _rep_dense_variables(module: nn.Module, cin: int, features: int, names, kernel_init: Initializer):
    """Create a `RepDense`'s variables on ``module`` (its fields ``num_branches``, ``deploy``,
    ``bn_momentum``, ``param_dtype``) and return them as the dict `rep_dense` reads, with a
    function updating the running averages (None in deploy form). ``names``: the logical axes
    of the (in, out) features.

    Deploy form: ``kernel``/``bias``. Training form: ``branch_kernel`` ``[r, in, out]`` and
    ``bn`` (``nn.BatchNorm``'s variables over ``(r, out)``), whose running averages the dict
    holds as ``bn_mean``/``bn_var``.
    """
    dt, r = module.param_dtype, module.num_branches
    if module.deploy:
        kernel = axes.param(module, "kernel", kernel_init, (cin, features), dt, names)
        bias = axes.param(module, "bias", nn.initializers.zeros, (features,), dt, names[1:])
        return {"kernel": kernel, "bias": bias}, None
    kernel = axes.param(module, "branch_kernel", kernel_init, (r, cin, features), dt,
                        ("branch", *names))
    bn = _BatchNormVariables(dt, ("branch", names[1]), name="bn")
    scale, bias, ra_mean, ra_var = bn((r, features))
    v = {"branch_kernel": kernel, "bn": {"scale": scale, "bias": bias},
         "bn_mean": ra_mean.value, "bn_var": ra_var.value}
    momentum = module.bn_momentum
    return v, lambda mean, var: update_running_stats(bn, ra_mean, ra_var, mean, var, momentum)


class _RepDenseVariables(nn.Module):
    """A `CompactMlp` factor's variables (see `_rep_dense_variables`), under the factor's name."""

    features: int
    names: tuple[str | None, str | None]
    num_branches: int
    deploy: bool
    bn_momentum: float
    kernel_init: Initializer
    param_dtype: Dtype

    @nn.compact
    def __call__(self, cin: int):
        return _rep_dense_variables(self, cin, self.features, self.names, self.kernel_init)


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
    names: tuple[str | None, str | None] = (None, None)  # logical axes of (in, out)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if self.num_branches < 1:
            raise ValueError(f"RepDense needs num_branches >= 1, got {self.num_branches}.")
        v, update = _rep_dense_variables(self, x.shape[-1], self.features, self.names,
                                         self.kernel_init)
        x, v = promote(self, x, v)
        train = train and not self.deploy
        plain = functools.partial(rep_dense, train=train, epsilon=self.bn_epsilon)
        fused_ = functools.partial(fused.rep_dense, train=train, epsilon=self.bn_epsilon)
        accel = functools.partial(rep_dense_accel, train=train, epsilon=self.bn_epsilon)
        y, mean, var = run(self.impl, plain, fused_, v, x, accel=accel, pallas=accel)
        if mean is not None:
            update(mean, var)
        return y


class _FFN(nn.Module):
    """The fields and steps `Mlp` and `CompactMlp` share."""

    hidden_features: int
    out_features: int | None = None
    act: Activation = "gelu"
    use_dwconv: bool = False
    drop: float = 0.0
    kernel_init: Initializer = timm_trunc_normal
    impl: str = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def _dense(self, features: int, name: str, names, n_in: int, use_bias: bool = True):
        return DenseParams(features, use_bias, self.kernel_init, self.param_dtype, names,
                           name=name)(n_in)

    def _dwconv(self, x, grid) -> dict[str, Any]:
        _check_dwconv_grid(x, grid)
        return _DWConvParams(self.param_dtype, name="dwconv")(self.hidden_features)

    def _run(self, plain, fused_, v, x, grid, training: bool, kernels=None, **kwargs):
        """``run`` of the promoted ``x`` and ``v`` (``kwargs``: the forward's settings;
        ``kernels``: further implementations by name, as `run` takes them): dropout on the
        hidden layer (the plain path's hook) in training; returns the output and the output
        dropout."""
        x, v = promote(self, x, v)
        kwargs.update(grid=None if grid is None else tuple(grid), act=self.act)
        drop = nn.Dropout(self.drop)
        hook = (lambda h: drop(h, deterministic=False)) if training and self.drop > 0 else None
        extra = {name: functools.partial(f, **kwargs) for name, f in (kernels or {}).items()}
        out = run(self.impl, functools.partial(plain, **kwargs), functools.partial(fused_, **kwargs),
                  v, x, hook=hook, **extra)
        return out, functools.partial(drop, deterministic=not training)


class Mlp(_FFN):
    """Standard FFN: fc1 -> [depthwise 3x3 conv] -> act -> dropout -> fc2 -> dropout.

    Params ``fc1``, ``fc2`` (``nn.Dense``'s) and, with ``use_dwconv``, ``dwconv/conv``.
    """

    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array | PreNorm, grid: Sequence[int] | None = None, *,
                 train: bool = False) -> jax.Array:
        c, hidden = x.shape[-1], self.hidden_features
        p = {"fc1": self._dense(hidden, "fc1", ("embed", "mlp"), c, self.use_bias)}
        if self.use_dwconv:
            p["dwconv"] = self._dwconv(x, grid)
        p["fc2"] = self._dense(self.out_features or c, "fc2", ("mlp", "embed"), hidden, self.use_bias)
        y, drop = self._run(mlp, fused.mlp, p, x, grid, train)
        return drop(y)


class CompactMlp(_FFN):
    """cFFN (docs/design.md section 3): an FFN with one of its two matrices factorized.

    ``factorize="w2"`` (default): ``fc1 -> [dwconv] -> act -> fc2a (mC -> c') -> fc2b (c' -> C)``,
    no nonlinearity between the factors. ``factorize="w1"``: ``fc1a (C -> c') -> fc1b (c' -> mC)
    -> [dwconv] -> act -> fc2``. Each factor is a `RepDense` with ``num_branches`` training-time
    branches (folded with ``deploy=True``); ``c' = compact_width(...)``, logical axis
    ``"compact"``.
    """

    compact_ratio: float = 2.0 / 3.0
    round_to: int = 1
    num_branches: int = 2
    factorize: str = "w2"
    deploy: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    def _factors(self, cin: int, hidden: int, cout: int, x, grid):
        """The variables (`rep_dense`'s dicts for the factors) and the running-average updates."""
        rep = lambda f, name, names, n_in: _RepDenseVariables(  # noqa: E731
            f, names, self.num_branches, self.deploy, self.bn_momentum, self.kernel_init,
            self.param_dtype, name=name)(n_in)
        v, updates = {}, {}
        if self.factorize == "w1":
            width = compact_width(cin, hidden, self.compact_ratio, self.round_to)
            v["fc1a"], updates["fc1a"] = rep(width, "fc1a", ("embed", "compact"), cin)
            v["fc1b"], updates["fc1b"] = rep(hidden, "fc1b", ("compact", "mlp"), width)
        else:
            v["fc1"] = self._dense(hidden, "fc1", ("embed", "mlp"), cin)
        if self.use_dwconv:
            v["dwconv"] = self._dwconv(x, grid)
        if self.factorize == "w2":
            width = compact_width(hidden, cout, self.compact_ratio, self.round_to)
            v["fc2a"], updates["fc2a"] = rep(width, "fc2a", ("mlp", "compact"), hidden)
            v["fc2b"], updates["fc2b"] = rep(cout, "fc2b", ("compact", "embed"), width)
        else:
            v["fc2"] = self._dense(cout, "fc2", ("mlp", "embed"), hidden)
        return v, updates

    @nn.compact
    def __call__(self, x: jax.Array | PreNorm, grid: Sequence[int] | None = None, *,
                 train: bool = False) -> jax.Array:
        if self.factorize not in FACTORIZE:
            raise ValueError(f"factorize must be one of {FACTORIZE}, got {self.factorize!r}.")
        if self.num_branches < 1:
            raise ValueError(f"CompactMlp needs num_branches >= 1, got {self.num_branches}.")
        cin = x.shape[-1]
        v, updates = self._factors(cin, self.hidden_features, self.out_features or cin, x, grid)
        accel = functools.partial(cffn, accel=True)
        (y, stats), drop = self._run(cffn, fused.cffn, v, x, grid, train,
                                     {"accel": accel, "pallas": cffn_pallas}, factorize=self.factorize,
                                     train=train and not self.deploy, epsilon=self.bn_epsilon)
        for name, (mean, var) in stats.items():
            updates[name](mean, var)
        return drop(y)
