"""CPU-tuned custom-VJP ops: activations, LayerNorm, BatchNorm and the FFN matmuls.

Each op computes exactly what its textbook form computes (the plain layers in
`halluvit_jax.layers` are the reference; tests check values and gradients against float64
references) but keeps less for the backward pass: the backward pass recomputes activations,
normalized tokens and the hidden layer from tensors that are kept anyway. Several backward
passes tie their recomputation to the incoming cotangent (`after`), an XLA-CPU scheduling
workaround: without it XLA's CPU pipeline hoists the recomputation into the forward pass.

These run only when a layer's ``impl`` resolves to ``"fused"`` (by default: on CPU).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

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
    keeps ``x``, the per-token mean and 1/std, and rebuilds ``y`` (see `halluvit_jax.layers.PreNorm`).
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
    (see `halluvit_jax.layers.PreNorm`). ``act`` is any function (static); its own VJP is used for the recomputed
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
