"""CPU-tuned versions of the layers' forward passes (``impl="fused"``, the default on CPU).

Each function here has the signature and the values (and gradients, and BatchNorm statistics)
of its plain counterpart in `halluvit_jax.layers` (`mhsa`, `hmhsa`, `mlp`, `cffn`, ...), and
is built from the custom-VJP ops of `ops`, `attention` and `conv`: backward passes that
recompute the maps, the hidden layer and the normalized tokens instead of keeping them,
convolutions rewritten as shifted multiply-adds, matmuls laid out heads-first. They exist for
XLA's CPU backend; on TPU and GPU the plain path is the one to run (``impl="auto"``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from halluvit_jax.layers.common import PreNorm, get_activation
from halluvit_jax.layers.fused.attention import (
    CHH_SCOPE,
    IHH_SCOPE,
    attention_values,
    cross_head_hallucination,
    hal_logits,
    intra_head_hallucination,
    recomputing_attention,
    scaled_logits,
)
from halluvit_jax.layers.fused.conv import depthwise_conv, grouped_conv
from halluvit_jax.layers.fused.ops import (
    batch_norm_train,
    batch_normalize,
    dense_act_dense,
    gelu_exact,
    layer_norm,
    norm_dense,
    rep_dense_bn,
    softmax,
)

__all__ = [
    "CHH_SCOPE",
    "DWCONV_SCOPE",
    "IHH_SCOPE",
    "attention_values",
    "batch_norm",
    "batch_norm_train",
    "cffn",
    "cross_head_hallucination",
    "dense_act_dense",
    "depthwise_conv",
    "depthwise_conv3x3",
    "gelu_exact",
    "grouped_conv",
    "hal_logits",
    "hmhsa",
    "intra_head_hallucination",
    "layer_norm",
    "mhsa",
    "mlp",
    "norm_dense",
    "recomputing_attention",
    "rep_dense",
    "rep_dense_bn",
    "scaled_logits",
    "softmax",
]

# Named scope of the depthwise 3x3 conv of PVTv2's FFN written as shifted multiply-adds: the
# complexity counter counts each `mul` inside it as one MAC per output element.
DWCONV_SCOPE = "depthwise_conv3x3"


def _act(act):
    """The activation, with the erf GELU as `gelu_exact` (its backward keeps only x)."""
    return gelu_exact if act == "gelu" else get_activation(act)


def _split_prenorm(x):
    """``(tokens, (scale, bias) or None, epsilon)`` of an array or a `PreNorm`."""
    if isinstance(x, PreNorm):
        return x.x, (x.scale, x.bias), x.epsilon
    return x, None, 0.0


def _materialize(x):
    tokens, norm, eps = _split_prenorm(x)
    return tokens if norm is None else layer_norm(tokens, *norm, eps)


def _dense_parts(ps, x):
    """``dense(p, x)`` for every Dense params ``p`` in ``ps`` (the per-part slices of a joined
    kernel: one matmul each, since slicing a weight is free and slicing a ``[B, N, 3C]``
    activation costs copies), with a `PreNorm` folded in (`norm_dense`)."""
    kernels = tuple(p["kernel"] for p in ps)
    biases = tuple(p.get("bias") for p in ps)
    tokens, norm, eps = _split_prenorm(x)
    if norm is not None:
        return norm_dense(tokens, norm, kernels, biases, eps)
    return tuple(jnp.einsum("...i,io->...o", tokens, k) + (0 if b is None else b)
                 for k, b in zip(kernels, biases))


def _dense(p, x):
    return _dense_parts((p,), x)[0]


def _project_qkv(p, x, kv):
    if kv is None:
        return _dense_parts((p["q"], p["k"], p["v"]), x)
    return (_dense(p["q"], x), *_dense_parts((p["k"], p["v"]), kv))


def mhsa(p, x, kv=None, *, num_heads):
    b, n, c = x.shape
    h, d = num_heads, c // num_heads
    q, k, v = (t.reshape(b, t.shape[1], h, d) for t in _project_qkv(p, x, kv))
    out = recomputing_attention(q, k, v, (), scaled_logits).reshape(b, n, c)
    return _dense(p["proj"], out)


def hmhsa(p, x, kv=None, *, num_heads, variant, kv_grid, num_prefix_tokens):
    b, n, c = x.shape
    h, d = num_heads, c // num_heads
    hr = h // 2
    q, k, v = _project_qkv(p, x, kv)
    q, k, v = q.reshape(b, n, hr, d), k.reshape(b, -1, hr, d), v.reshape(b, -1, h, d)
    hal_params = {name: p[name] for name in ("ihh_kernel", "ihh_bias", "chh_kernel", "chh_bias")
                  if name in p}
    logits_fn = functools.partial(hal_logits, variant=variant, kv_grid=kv_grid,
                                  num_prefix_tokens=num_prefix_tokens)
    out = recomputing_attention(q, k, v, hal_params, logits_fn).reshape(b, n, c)
    return _dense(p["proj"], out)


def depthwise_conv3x3(p, x, grid=None):
    tokens = x.ndim == 3
    if tokens:
        x = x.reshape(x.shape[0], grid[0], grid[1], x.shape[-1])
    with jax.named_scope(DWCONV_SCOPE):
        # One sample at a time: in the full PVTv2 model XLA split the batched shifted sum into
        # seven materialized tensors (see depthwise_conv's batch_loop).
        y = depthwise_conv(x, p["kernel"].reshape(3, 3, 1, 1, 1, x.shape[-1]), axes=(1, 2),
                           batch_loop=x.shape[0] > 1)
    y = y + p["bias"]
    return y.reshape(y.shape[0], -1, y.shape[-1]) if tokens else y


def mlp(p, x, grid=None, *, act):
    if "dwconv" not in p and "bias" in p["fc1"] and "bias" in p["fc2"]:
        tokens, norm, eps = _split_prenorm(x)
        return dense_act_dense(tokens, p["fc1"]["kernel"], p["fc1"]["bias"], p["fc2"]["kernel"],
                               p["fc2"]["bias"], _act(act), norm, eps if norm else 1e-6)
    h = _dense(p["fc1"], x)
    if "dwconv" in p:
        h = depthwise_conv3x3(p["dwconv"]["conv"], h, grid)
    return _dense(p["fc2"], _act(act)(h))


def rep_dense(v, x, *, train, epsilon, act=None):
    """`halluvit_jax.layers.rep_dense` (``act`` optional, applied to ``x`` first and fused into
    the training-form op)."""
    if "kernel" in v:
        return _dense(v, x if act is None else act(x)), None, None
    if train:
        return rep_dense_bn(x, v["branch_kernel"], v["bn"]["scale"], v["bn"]["bias"], act, epsilon)
    y = jnp.einsum("...i,rio->...ro", x if act is None else act(x), v["branch_kernel"])
    rstd = jax.lax.rsqrt(v["bn_var"] + epsilon)
    out = batch_normalize(y, v["bn_mean"], rstd, v["bn"]["scale"], v["bn"]["bias"])
    return out.astype(y.dtype).sum(axis=-2), None, None


def cffn(v, x, grid=None, *, act, factorize, train, epsilon):
    stats = {}

    def rep(name, h, act=None):
        out, mean, var = rep_dense(v[name], h, train=train, epsilon=epsilon, act=act)
        if mean is not None:
            stats[name] = (mean, var)
        return out

    if factorize == "w1":
        h = rep("fc1b", rep("fc1a", _materialize(x)))
    else:
        h = _dense(v["fc1"], x)
    if "dwconv" in v:
        h = depthwise_conv3x3(v["dwconv"]["conv"], h, grid)
    if factorize == "w2":  # the activation goes into fc2a's op (rebuilt in its backward pass)
        y = rep("fc2b", rep("fc2a", h, act=_act(act)))
    else:
        y = _dense(v["fc2"], _act(act)(h))
    return y, stats


def batch_norm(x, scale, bias, mean, var, epsilon, train):
    if train:
        return batch_norm_train(x, scale, bias, epsilon)
    y = batch_normalize(x, mean, jax.lax.rsqrt(var + epsilon), scale, bias)
    return y.astype(x.dtype), mean, var
