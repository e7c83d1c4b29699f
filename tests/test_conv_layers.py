"""The CPU-friendly convolutions (halluvit_jax.layers.fused: depthwise_conv, grouped_conv) and the
conv layers on both paths (``impl="plain"``: lax.conv; ``"fused"``: those kernels) against
`lax.conv` with feature groups.

Outputs and gradients (input, kernel, bias) are compared with `jax.grad` of the grouped
`lax.conv_general_dilated` at HIGHEST precision, an independent implementation, on non-square
odd-sized grids.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from halluvit_jax.complexity import count_macs
from halluvit_jax.layers import DepthwiseConv3x3, fused
from halluvit_jax.layers import intra_head_hallucination as plain_ihh
from halluvit_jax.layers.common import timm_trunc_normal
from halluvit_jax.layers.fused import depthwise_conv, grouped_conv
from halluvit_jax.models.nextvit import GroupedConv3x3

IMPLS = ["plain", "fused"]


def _lax_conv(x, kernel, groups):
    """NHWC/HWIO stride-1 zero 'same' padded grouped correlation (the reference)."""
    kh, kw = kernel.shape[:2]
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST,
    )


def _assert_close(actual, expected, rtol=1e-5):
    expected = np.asarray(expected)
    np.testing.assert_allclose(
        np.asarray(actual), expected, rtol=rtol, atol=rtol * float(np.abs(expected).max())
    )


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (3, 8, 3, 5), (1, 1, 4, 3)])
def test_pvt_depthwise_conv_module_matches_lax_conv_with_gradients(shape, impl):
    c = shape[-1]
    x, ct = _normal(0, shape), _normal(1, shape)
    module = DepthwiseConv3x3(impl=impl)
    variables = module.init(jax.random.key(0), x)
    p = variables["params"]["conv"]
    assert p["kernel"].shape == (3, 3, 1, c) and p["bias"].shape == (c,)
    p = {"kernel": p["kernel"], "bias": _normal(2, (c,))}

    def ours(x, kernel, bias):
        return module.apply({"params": {"conv": {"kernel": kernel, "bias": bias}}}, x)

    def ref(x, kernel, bias):
        return _lax_conv(x, kernel, c) + bias

    _assert_close(ours(x, **p), ref(x, **p))
    loss = lambda f: lambda *a: jnp.sum(f(*a) * ct)
    got = jax.grad(loss(ours), argnums=(0, 1, 2))(x, p["kernel"], p["bias"])
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(x, p["kernel"], p["bias"])
    for g, w in zip(got, want):
        _assert_close(g, w)


@pytest.mark.parametrize("impl", IMPLS)
def test_pvt_depthwise_conv_on_tokens_matches_the_maps(impl):
    """Tokens [B, H*W, C] with grid=(H, W) give the conv of the [B, H, W, C] maps."""
    x = _normal(23, (2, 3, 5, 4))
    module = DepthwiseConv3x3(impl=impl)
    v = module.init(jax.random.key(0), x)
    v = {"params": {"conv": {"kernel": v["params"]["conv"]["kernel"], "bias": _normal(24, (4,))}}}
    want = _lax_conv(x, v["params"]["conv"]["kernel"], 4) + v["params"]["conv"]["bias"]
    _assert_close(module.apply(v, x.reshape(2, 15, 4), (3, 5)), want.reshape(2, 15, 4))


def test_pvt_depthwise_conv_on_tokens_needs_the_grid():
    x = jnp.ones((2, 12, 4))
    with pytest.raises(ValueError, match="grid=\\(H, W\\)"):
        DepthwiseConv3x3().init(jax.random.key(0), x, (3, 3))


@pytest.mark.parametrize("kernel_size", [(3, 3), (5, 3)])
def test_depthwise_conv_on_the_ihh_layout_matches_lax_conv(kernel_size):
    """Grid [B, H, N, hk, wk] convolved over (hk, wk) per head: the IHH layout."""
    b, h, n, hk, wk = 2, 3, 4, 5, 7
    kh, kw = kernel_size
    grid, ct = _normal(3, (b, h, n, hk, wk)), _normal(4, (b, h, n, hk, wk))
    kernel = _normal(5, (h, kh, kw), 0.3)

    def ours(grid, kernel):
        taps = jnp.transpose(kernel, (1, 2, 0))[:, :, None, :, None, None, None]
        return depthwise_conv(grid, taps, (3, 4))

    def ref(grid, kernel):  # as NHWC maps: batch (b, n), channels = heads
        maps = jnp.transpose(grid, (0, 2, 3, 4, 1)).reshape(b * n, hk, wk, h)
        hwio = jnp.transpose(kernel, (1, 2, 0))[:, :, None, :]
        out = _lax_conv(maps, hwio, h).reshape(b, n, hk, wk, h)
        return jnp.transpose(out, (0, 4, 1, 2, 3))

    _assert_close(ours(grid, kernel), ref(grid, kernel))
    loss = lambda f: lambda *a: jnp.sum(f(*a) * ct)
    for g, w in zip(jax.grad(loss(ours), (0, 1))(grid, kernel), jax.grad(loss(ref), (0, 1))(grid, kernel)):
        _assert_close(g, w)


@pytest.mark.parametrize("impl", IMPLS)
def test_ihh_with_class_token_matches_lax_conv(impl):
    """IHH on heads-first logits [B, H, N, Nk] (the fused op's layout; the plain one takes
    [B, N, H, Nk])."""
    b, h, n, (hk, wk) = 2, 2, 3, (3, 5)
    logits = _normal(6, (b, h, n, 1 + hk * wk))
    kernel, bias = _normal(7, (h, 3, 3)), _normal(8, (h,))
    if impl == "fused":
        out = fused.intra_head_hallucination(logits, kernel, bias, (hk, wk), 1)
    else:
        out = jnp.swapaxes(plain_ihh(jnp.swapaxes(logits, 1, 2), kernel, bias, (hk, wk), 1), 1, 2)
    maps = jnp.transpose(logits[..., 1:].reshape(b, h, n, hk, wk), (0, 2, 3, 4, 1))
    ref = _lax_conv(maps.reshape(b * n, hk, wk, h), jnp.transpose(kernel, (1, 2, 0))[:, :, None], h)
    ref = jnp.transpose(ref.reshape(b, n, hk, wk, h) + bias, (0, 4, 1, 2, 3)).reshape(b, h, n, -1)
    _assert_close(out[..., 1:], ref)
    np.testing.assert_array_equal(out[..., :1], logits[..., :1])


@pytest.mark.parametrize(
    "shape,groups,cout", [((2, 5, 7, 64), 2, 64), ((3, 3, 5, 12), 3, 12), ((1, 7, 4, 8), 2, 6)]
)
def test_grouped_conv_matches_lax_conv_with_gradients(shape, groups, cout):
    x, ct = _normal(9, shape), _normal(10, shape[:-1] + (cout,))
    kernel = _normal(11, (3, 3, shape[-1] // groups, cout), 0.1)
    ours = lambda x, k: grouped_conv(x, k, groups)
    ref = lambda x, k: _lax_conv(x, k, groups)
    _assert_close(ours(x, kernel), ref(x, kernel))
    loss = lambda f: lambda *a: jnp.sum(f(*a) * ct)
    got, want = jax.grad(loss(ours), (0, 1))(x, kernel), jax.grad(loss(ref), (0, 1))(x, kernel)
    for g, w in zip(got, want):
        _assert_close(g, w)


@pytest.mark.parametrize("impl", ["plain", "fused", "auto"])
def test_nextvit_grouped_conv_keeps_nn_conv_params_and_init(impl):
    """Same param name, shape and initial values as the `nn.Conv` it replaces (checkpoints and
    timm conversion unchanged), same outputs and gradients, and the same MAC count
    (outputs x 9 x 32) on every path."""
    x, ct = _normal(12, (2, 5, 3, 64)), _normal(13, (2, 5, 3, 64))
    conv = nn.Conv(64, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=2, use_bias=False,
                   kernel_init=timm_trunc_normal, precision=jax.lax.Precision.HIGHEST)
    ours = GroupedConv3x3(2, impl=impl)
    v_ref, v_ours = conv.init(jax.random.key(3), x), ours.init(jax.random.key(3), x)
    assert jax.tree_util.tree_map(jnp.shape, v_ours) == {"params": {"kernel": (3, 3, 32, 64)}}
    np.testing.assert_array_equal(v_ours["params"]["kernel"], v_ref["params"]["kernel"])
    _assert_close(ours.apply(v_ref, x), conv.apply(v_ref, x))
    loss = lambda m: lambda v, x: jnp.sum(m.apply(v, x) * ct)  # noqa: E731
    got = jax.grad(loss(ours), (0, 1))(v_ref, x)
    want = jax.grad(loss(conv), (0, 1))(v_ref, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        _assert_close(g, w)
    macs = count_macs(ours, (1, 6, 5, 64))
    assert macs == count_macs(conv, (1, 6, 5, 64)) == 6 * 5 * 64 * 9 * 32


@pytest.mark.parametrize("impl", ["plain", "fused", "auto"])
def test_depthwise_conv_macs_are_nine_per_output(impl):
    assert count_macs(DepthwiseConv3x3(impl=impl), (2, 5, 7, 16)) == 2 * 5 * 7 * 16 * 9


def test_depthwise_conv_backward_keeps_no_shifted_copies():
    """The custom VJP's compiled train step needs far less scratch memory than plain autodiff
    of the same nine shifted multiply-adds (which saves every shifted copy)."""
    shape = (8, 28, 28, 128)
    x, kernel = jnp.zeros(shape), jnp.zeros((3, 3, 1, 1, 1, 128))

    def plain(x, kernel):
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return sum(kernel[i, j] * padded[:, i : i + 28, j : j + 28] for i in range(3) for j in range(3))

    def temp_bytes(f):
        step = jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(f(x, k))), (0, 1)))
        return step.lower(x, kernel).compile().memory_analysis().temp_size_in_bytes

    ours = temp_bytes(lambda x, k: depthwise_conv(x, k, (1, 2)))
    assert ours < 0.5 * temp_bytes(plain), (ours, temp_bytes(plain))


def test_bad_conv_arguments_are_clear_errors():
    x = jnp.zeros((1, 4, 4, 6))
    with pytest.raises(ValueError, match="odd kernel size"):
        depthwise_conv(x, jnp.zeros((2, 2, 1, 1, 1, 6)), (1, 2))
    with pytest.raises(ValueError, match="broadcastable"):
        depthwise_conv(x, jnp.zeros((3, 3, 1, 6)), (1, 2))
    with pytest.raises(ValueError, match="two distinct grid axes"):
        depthwise_conv(x, jnp.zeros((3, 3, 1, 1, 1, 6)), (1, 1))
    with pytest.raises(ValueError, match="do not split"):
        grouped_conv(x, jnp.zeros((3, 3, 4, 6)), 4)
    with pytest.raises(ValueError, match="batch_loop"):
        depthwise_conv(x, jnp.zeros((3, 3, 1, 1, 1, 6)), (0, 2), batch_loop=True)
    with pytest.raises(ValueError, match="batch_loop"):
        depthwise_conv(jnp.zeros((2, 4, 4, 6)), jnp.zeros((3, 3, 2, 1, 1, 6)), (1, 2), batch_loop=True)


def test_depthwise_conv_batch_loop_matches_lax_conv_with_gradients():
    """The per-sample loop (used by PVTv2's FFN conv) computes the same conv and gradients."""
    x, ct = _normal(20, (3, 6, 5, 4)), _normal(21, (3, 6, 5, 4))
    kernel = _normal(22, (3, 3, 1, 4), 0.3)
    ours = lambda x, k: depthwise_conv(x, k.reshape(3, 3, 1, 1, 1, 4), (1, 2), batch_loop=True)
    ref = lambda x, k: _lax_conv(x, k, 4)
    _assert_close(ours(x, kernel), ref(x, kernel))
    loss = lambda f: lambda *a: jnp.sum(f(*a) * ct)
    for g, w in zip(jax.grad(loss(ours), (0, 1))(x, kernel), jax.grad(loss(ref), (0, 1))(x, kernel)):
        _assert_close(g, w)
