"""The CPU-friendly convolutions (halluvit_jax.layers.fused: depthwise_conv, grouped_conv) and the
conv layers on both paths (``impl="plain"``: lax.conv; ``"fused"``: those kernels) against the
float64 NumPy references of tests/reference_numpy.py: explicit sums over the kernel taps of
shifted slices of the zero-padded input, and their hand-written gradients (checked against
central differences below). Outputs and gradients (input, kernel, bias) on non-square odd-sized
grids; float32 results within 1e-5 (values) / 1e-4 (gradients) of the float64 scale.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_numpy as ref

from halluvit_jax.complexity import count_macs
from halluvit_jax.layers import DepthwiseConv3x3, fused
from halluvit_jax.layers import intra_head_hallucination as plain_ihh
from halluvit_jax.layers.common import timm_trunc_normal
from halluvit_jax.layers.fused import depthwise_conv, grouped_conv
from halluvit_jax.models.nextvit import GroupedConv3x3

IMPLS = ["plain", "fused"]
RTOL, RTOL_GRAD = 1e-5, 1e-4


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale)


def _check_conv(ours, x, kernel, groups, ct, bias=None):
    """``ours(x, kernel[, bias])`` against the float64 grouped conv (+ bias): values, and the
    gradients of ``sum(out * ct)`` w.r.t. every argument."""
    args = (x, kernel) if bias is None else (x, kernel, bias)
    want = ref.conv2d_same(x, kernel, groups) + (0.0 if bias is None else ref.f64(bias))
    ref.assert_close(ours(*args), want, RTOL, "values")
    got = jax.grad(lambda *a: jnp.sum(ours(*a) * ct), argnums=tuple(range(len(args))))(*args)
    dx, dk = ref.conv2d_same_vjp(x, kernel, ct, groups)
    wants = (dx, dk) if bias is None else (dx, dk, ref.f64(ct).sum(axis=(0, 1, 2)))
    for name, g, w in zip(("input", "kernel", "bias"), got, wants):
        ref.assert_close(g, w, RTOL_GRAD, f"d/d{name}")


def test_the_reference_conv_gradients_equal_central_differences():
    """The hand-written conv VJP of the reference against float64 central differences."""
    x, kernel, ct = _normal(30, (2, 4, 5, 4)), _normal(31, (3, 3, 2, 6)), _normal(32, (2, 4, 5, 6))
    got = ref.conv2d_same_vjp(x, kernel, ct, 2)
    want = ref.numeric_grad(lambda x, k: ref.conv2d_same(x, k, 2), (x, kernel), (0, 1), ct)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-8, atol=1e-8)
    # And the reference conv itself on a hand-checkable case: a centred 1 tap is the identity, a
    # tap to the right reads the right neighbour (zero past the edge).
    maps = np.arange(12.0).reshape(1, 3, 4, 1)
    k = np.zeros((3, 3, 1, 1))
    k[1, 1] = 1.0
    np.testing.assert_array_equal(ref.conv2d_same(maps, k), maps)
    k[1, 1], k[1, 2] = 0.0, 1.0
    want = np.concatenate([maps[:, :, 1:], np.zeros((1, 3, 1, 1))], axis=2)
    np.testing.assert_array_equal(ref.conv2d_same(maps, k), want)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (3, 8, 3, 5), (1, 1, 4, 3)])
def test_pvt_depthwise_conv_module_matches_the_reference_with_gradients(shape, impl):
    c = shape[-1]
    x, ct = _normal(0, shape), _normal(1, shape)
    module = DepthwiseConv3x3(impl=impl)
    variables = module.init(jax.random.key(0), x)
    p = variables["params"]["conv"]
    assert p["kernel"].shape == (3, 3, 1, c) and p["bias"].shape == (c,)

    def ours(x, kernel, bias):
        return module.apply({"params": {"conv": {"kernel": kernel, "bias": bias}}}, x)

    _check_conv(ours, x, p["kernel"], c, ct, _normal(2, (c,)))


@pytest.mark.parametrize("impl", IMPLS)
def test_pvt_depthwise_conv_on_tokens_matches_the_maps(impl):
    """Tokens [B, H*W, C] with grid=(H, W) give the conv of the [B, H, W, C] maps."""
    x = _normal(23, (2, 3, 5, 4))
    module = DepthwiseConv3x3(impl=impl)
    v = module.init(jax.random.key(0), x)
    v = {"params": {"conv": {"kernel": v["params"]["conv"]["kernel"], "bias": _normal(24, (4,))}}}
    want = ref.conv2d_same(x, v["params"]["conv"]["kernel"], 4) + ref.f64(v["params"]["conv"]["bias"])
    ref.assert_close(module.apply(v, x.reshape(2, 15, 4), (3, 5)), want.reshape(2, 15, 4), RTOL)


def test_pvt_depthwise_conv_on_tokens_needs_the_grid():
    x = jnp.ones((2, 12, 4))
    with pytest.raises(ValueError, match="grid=\\(H, W\\)"):
        DepthwiseConv3x3().init(jax.random.key(0), x, (3, 3))


def _heads_as_channels(grid):
    """[B, H, N, hk, wk] -> NHWC maps [B * N, hk, wk, H]."""
    b, h, n, hk, wk = grid.shape
    return np.moveaxis(ref.f64(grid), 1, -1).reshape(b * n, hk, wk, h)


def _heads_back(maps, b, n):
    """NHWC maps [B * N, hk, wk, H] -> [B, H, N, hk, wk]."""
    _, hk, wk, h = maps.shape
    return np.moveaxis(maps.reshape(b, n, hk, wk, h), -1, 1)


@pytest.mark.parametrize("kernel_size", [(3, 3), (5, 3)])
def test_depthwise_conv_on_the_ihh_layout_matches_the_reference(kernel_size):
    """Grid [B, H, N, hk, wk] convolved over (hk, wk) per head: the IHH layout."""
    b, h, n, hk, wk = 2, 3, 4, 5, 7
    kh, kw = kernel_size
    grid, ct = _normal(3, (b, h, n, hk, wk)), _normal(4, (b, h, n, hk, wk))
    kernel = _normal(5, (h, kh, kw), 0.3)

    def ours(grid, kernel):
        taps = jnp.transpose(kernel, (1, 2, 0))[:, :, None, :, None, None, None]
        return depthwise_conv(grid, taps, (3, 4))

    hwio = np.transpose(ref.f64(kernel), (1, 2, 0))[:, :, None, :]  # per-head kernels as HWIO
    maps, maps_ct = _heads_as_channels(grid), _heads_as_channels(ct)
    ref.assert_close(ours(grid, kernel), _heads_back(ref.conv2d_same(maps, hwio, h), b, n), RTOL)
    got = jax.grad(lambda *a: jnp.sum(ours(*a) * ct), (0, 1))(grid, kernel)
    dmaps, dhwio = ref.conv2d_same_vjp(maps, hwio, maps_ct, h)
    ref.assert_close(got[0], _heads_back(dmaps, b, n), RTOL_GRAD, "d/dgrid")
    ref.assert_close(got[1], np.transpose(dhwio[:, :, 0, :], (2, 0, 1)), RTOL_GRAD, "d/dkernel")


@pytest.mark.parametrize("impl", IMPLS)
def test_ihh_with_class_token_matches_the_reference(impl):
    """IHH on heads-first logits [B, H, N, Nk] (the fused op's layout; the plain one takes
    [B, N, H, Nk]): the class-token column passes through, the grid columns are each head's
    3x3 conv over the key grid plus its bias."""
    b, h, n, (hk, wk) = 2, 2, 3, (3, 5)
    logits = _normal(6, (b, h, n, 1 + hk * wk))
    kernel, bias = _normal(7, (h, 3, 3)), _normal(8, (h,))
    if impl == "fused":
        out = fused.intra_head_hallucination(logits, kernel, bias, (hk, wk), 1)
    else:
        out = jnp.swapaxes(plain_ihh(jnp.swapaxes(logits, 1, 2), kernel, bias, (hk, wk), 1), 1, 2)
    want = ref.intra_head_hallucination(logits, kernel, bias, (hk, wk), 1)
    ref.assert_close(out, want, RTOL)
    np.testing.assert_array_equal(out[..., :1], logits[..., :1])


@pytest.mark.parametrize(
    "shape,groups,cout", [((2, 5, 7, 64), 2, 64), ((3, 3, 5, 12), 3, 12), ((1, 7, 4, 8), 2, 6)]
)
def test_grouped_conv_matches_the_reference_with_gradients(shape, groups, cout):
    x, ct = _normal(9, shape), _normal(10, shape[:-1] + (cout,))
    kernel = _normal(11, (3, 3, shape[-1] // groups, cout), 0.1)
    _check_conv(lambda x, k: grouped_conv(x, k, groups), x, kernel, groups, ct)


@pytest.mark.parametrize("impl", ["plain", "fused", "auto"])
def test_nextvit_grouped_conv_keeps_nn_conv_params_and_init(impl):
    """Same param name, shape and initial values as the `nn.Conv` it replaces (checkpoints and
    timm conversion unchanged), the reference's outputs and gradients, and the same MAC count
    (outputs x 9 x 32) on every path."""
    x, ct = _normal(12, (2, 5, 3, 64)), _normal(13, (2, 5, 3, 64))
    conv = nn.Conv(64, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=2, use_bias=False,
                   kernel_init=timm_trunc_normal)
    ours = GroupedConv3x3(2, impl=impl)
    v_ref, v_ours = conv.init(jax.random.key(3), x), ours.init(jax.random.key(3), x)
    assert jax.tree_util.tree_map(jnp.shape, v_ours) == {"params": {"kernel": (3, 3, 32, 64)}}
    np.testing.assert_array_equal(v_ours["params"]["kernel"], v_ref["params"]["kernel"])
    apply = lambda x, k: ours.apply({"params": {"kernel": k}}, x)  # noqa: E731
    _check_conv(apply, x, v_ours["params"]["kernel"], 2, ct)
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


def test_depthwise_conv_batch_loop_matches_the_reference_with_gradients():
    """The per-sample loop (used by PVTv2's FFN conv) computes the same conv and gradients."""
    x, ct = _normal(20, (3, 6, 5, 4)), _normal(21, (3, 6, 5, 4))
    kernel = _normal(22, (3, 3, 1, 4), 0.3)
    ours = lambda x, k: depthwise_conv(x, k.reshape(3, 3, 1, 1, 1, 4), (1, 2), batch_loop=True)  # noqa: E731
    _check_conv(ours, x, kernel, 4, ct)
