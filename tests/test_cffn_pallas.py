"""The cFFN's training-mode kernels (`halluvit_jax.layers.kernels.cffn_pallas`): values, batch
statistics and gradients equal to the plain `rep_dense` pair (in Pallas' interpreter on CPU),
with blocks small enough that the sums run over several grid steps; their block choice; a
deviceless TPU compile where libtpu is installed; and the kernels per batch shard on a mesh.

The model-level equivalence (`CompactMlp(impl="pallas")` against ``impl="plain"``, every input
layout) is in tests/test_impl_equivalence.py."""

from __future__ import annotations

import functools
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from halluvit_jax.layers.common import ACTIVATIONS
from halluvit_jax.layers.kernels import cffn_pallas

mlp_module = importlib.import_module("halluvit_jax.layers.mlp")
EPS = 1e-5


def _branches(seed, r, n_in, n_out):
    ks = jax.random.split(jax.random.key(seed), 3)
    return {"branch_kernel": jax.random.normal(ks[0], (r, n_in, n_out)) / np.sqrt(n_in),
            "bn": {"scale": 1 + 0.2 * jax.random.normal(ks[1], (r, n_out)),
                   "bias": 0.2 * jax.random.normal(ks[2], (r, n_out))}}


def _plain(h, va, vb, act):
    z, mean_a, var_a = mlp_module.rep_dense(va, act(h), train=True, epsilon=EPS)
    out, mean_b, var_b = mlp_module.rep_dense(vb, z, train=True, epsilon=EPS)
    return out, (mean_a, var_a, mean_b, var_b)


def _close(got, want, rtol, what):
    for i, (g, w) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want))):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        scale = max(float(np.max(np.abs(w))), 1e-3)
        err = float(np.max(np.abs(g - w)))
        assert err <= rtol * scale, f"{what} leaf {i}: max error {err:.3g} > {rtol * scale:.3g}"


# (h shape, act, branches, block cap): the kernels read [N, B, mC] / [H, W, B, mC]; tokens in
# blocks of 8 batch rows (2 per token), maps one position per block (no loop) and two (a loop).
CASES = {
    "tokens": ((16, 5, 40), "gelu", 2, 8 * 40),
    "maps_one_position": ((3, 4, 5, 40), "relu", 2, 3 * 40),
    "maps_two_positions": ((3, 2, 4, 40), "gelu_tanh", 3, 2 * 3 * 40),
    "one_branch": ((16, 9, 40), "silu", 1, 8 * 40),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow] * (c in ("maps_one_position", "one_branch")))
                                  for c in sorted(CASES)])  # the fast tier keeps one tokens and one maps case
def test_kernels_match_the_plain_branches(case, monkeypatch):
    """Out, the four batch statistics, and the gradients w.r.t. ``h`` and every weight of both
    factors (a loss that also weighs the statistics, so their cotangents are checked too)."""
    shape, act_name, r, cap = CASES[case]
    monkeypatch.setattr(cffn_pallas, "_BLOCK_CAP", cap)  # sums over several grid steps
    view = cffn_pallas._view_shape(shape)
    block = cffn_pallas._block(view)
    assert block[0] < view[1]
    act = ACTIVATIONS[act_name]
    h = 1.5 * jax.random.normal(jax.random.key(1), shape) + 0.2
    va, vb = _branches(2, r, 40, 12), _branches(3, r, 12, 24)
    g = jax.random.normal(jax.random.key(4), (*shape[:-1], 24))
    kernels = functools.partial(cffn_pallas.compact_output, act=act, epsilon=EPS, interpret=True)

    def loss(f):
        def value(h, va, vb):
            out, stats = f(h, va, vb)
            return jnp.sum(out * g) + sum(jnp.sum(s * (1.0 + i)) for i, s in enumerate(stats))
        return value

    want_out, want_stats = _plain(h, va, vb, act)
    got_out, got_stats = kernels(h, va, vb)
    _close(got_out, want_out, 1e-5, "out")
    _close(got_stats, want_stats, 1e-5, "stats")
    want = jax.grad(loss(functools.partial(_plain, act=act)), (0, 1, 2))(h, va, vb)
    got = jax.grad(loss(kernels), (0, 1, 2))(h, va, vb)
    _close(got, want, 2e-4, "grads")


@pytest.mark.parametrize("case", ["tokens", "maps_two_positions"])
def test_kernels_with_fc1_match_the_plain_ffn(case, monkeypatch):
    """`compact_ffn` (fc1 inside the kernels: ``h`` written once, ``dh`` never) against fc1 ->
    act -> the plain branches: out, statistics, and the gradients w.r.t. ``x``, fc1's kernel
    and bias, and both factors."""
    shape, act_name, r, cap = CASES[case]
    monkeypatch.setattr(cffn_pallas, "_BLOCK_CAP", cap)
    act = ACTIVATIONS[act_name]
    x = jax.random.normal(jax.random.key(5), (*shape[:-1], 16))
    ks = jax.random.split(jax.random.key(6), 2)
    fc1 = {"kernel": jax.random.normal(ks[0], (16, 40)) / 4.0, "bias": 0.3 * jax.random.normal(ks[1], (40,))}
    va, vb = _branches(2, r, 40, 12), _branches(3, r, 12, 24)
    g = jax.random.normal(jax.random.key(4), (*shape[:-1], 24))

    def plain(x, fc1, va, vb):
        return _plain(x @ fc1["kernel"] + fc1["bias"], va, vb, act)

    kernels = functools.partial(cffn_pallas.compact_ffn, act=act, epsilon=EPS, interpret=True)

    def loss(f):
        def value(x, fc1, va, vb):
            out, stats = f(x, fc1, va, vb)
            return jnp.sum(out * g) + sum(jnp.sum(s * (1.0 + i)) for i, s in enumerate(stats))
        return value

    want_out, want_stats = plain(x, fc1, va, vb)
    got_out, got_stats = kernels(x, fc1, va, vb)
    _close(got_out, want_out, 1e-5, "out")
    _close(got_stats, want_stats, 1e-5, "stats")
    _close(jax.grad(loss(kernels), (0, 1, 2, 3))(x, fc1, va, vb),
           jax.grad(loss(plain), (0, 1, 2, 3))(x, fc1, va, vb), 2e-4, "grads")


def test_blocks_divide_the_rows():
    """A divisor (no ragged block whose padding would enter the sums), in multiples of 8 batch
    rows or whole ``[B, mC]`` slabs, under the cap; all rows where they fit or nothing divides."""
    cap = cffn_pallas._BLOCK_CAP
    view = cffn_pallas._view_shape
    assert view((128, 197, 1536)) == (197, 128, 1536) and view((128, 14, 7, 96)) == (14, 7, 128, 96)
    assert cffn_pallas._block(view((128, 197, 1536))) == (128, 1536)  # DeiT: one token per step
    assert cffn_pallas._block(view((2048, 197, 1536))) == (512, 1536)  # 512 * 1536 <= 2^20
    assert cffn_pallas._block(view((128, 56, 56, 288))) == (28, 128, 288)  # 28 positions of 128 x 288
    assert cffn_pallas._block(view((128, 7, 7, 3072))) == (1, 128, 3072)  # 2 fit, but 7 is prime
    rows = cffn_pallas.row_block(1000, 4096, 8)  # 1000 = 8 * 125: 200 rows of 4096 <= 2^20
    assert rows == 200 and 1000 % rows == 0 and rows * 4096 <= cap
    assert cffn_pallas.row_block(1001, 4096, 8) == 1001  # no multiple of 8 divides 1001
    # NextViT's maps, batch on the lanes ([H, W, C, B]): whole [C, B] slabs of a map row's
    # positions, as many as divide the row under the cap.
    lanes = lambda b, hw, c: cffn_pallas._lanes_block((hw, hw, c, b))  # noqa: E731
    assert lanes(128, 56, 288) == (28, 288, 128) and lanes(128, 14, 1152) == (7, 1152, 128)
    assert lanes(128, 7, 3072) == (1, 3072, 128)


def test_layers_outside_the_vmem_budget_run_the_xla_form():
    """A layer whose blocks would not fit `VMEM_BUDGET` takes the accel path (no kernel), as do
    eval mode, the ``w1`` factorization, and NHWC maps whose batch shard is no multiple of the
    128 lanes or has fewer rows than 4 times the hidden width (NextViT-S's 7x7 stage at 128
    images per chip)."""
    x = jnp.zeros((2, 8, 16))
    small = {"fc2a": {"branch_kernel": jnp.zeros((2, 64, 20))}, "fc2b": {"branch_kernel": jnp.zeros((2, 20, 16))}}
    assert mlp_module._pallas_applies(small, x, None, factorize="w2", train=True)
    assert not mlp_module._pallas_applies(small, x.reshape(2, 2, 4, 16), None, factorize="w2", train=True)
    maps = lambda b, hw, c: jax.ShapeDtypeStruct((b, hw, hw, c), jnp.bfloat16)  # noqa: E731
    nextvit = lambda c, ratio: {"fc2a": {"branch_kernel": jax.ShapeDtypeStruct((2, ratio * c, c // 2), jnp.float32)},  # noqa: E731
                                "fc2b": {"branch_kernel": jax.ShapeDtypeStruct((2, c // 2, c), jnp.float32)}}
    applies = functools.partial(mlp_module._pallas_applies, grid=None, factorize="w2", train=True)
    assert applies(nextvit(384, 3), maps(128, 14, 384))  # 25088 rows >= 4 x 1152
    assert applies(nextvit(96, 3), maps(256, 56, 96))
    assert not applies(nextvit(384, 3), maps(64, 14, 384))  # half the lanes
    assert not applies(nextvit(768, 3), maps(128, 7, 768))  # 6272 rows < 4 x 2304
    assert applies(nextvit(768, 3), maps(256, 7, 768))  # 12544 rows
    assert not applies(nextvit(4096, 4), maps(1024, 14, 4096))  # W1, Wa, W_comb: over VMEM_BUDGET
    assert not mlp_module._pallas_applies(small, x, None, factorize="w2", train=False)  # eval
    assert not mlp_module._pallas_applies(small, x, None, factorize="w1", train=True)
    huge = {"fc2a": {"branch_kernel": jax.ShapeDtypeStruct((2, 16384, 4096), jnp.bfloat16)},
            "fc2b": {"branch_kernel": jax.ShapeDtypeStruct((2, 4096, 4096), jnp.bfloat16)}}
    assert not mlp_module._pallas_applies(huge, x.astype(jnp.bfloat16), None, factorize="w2", train=True)
    # fc1 inside the kernels adds its weight and gradient: 4096 x 4096 in, 4096 hidden fits
    # after a dwconv (fc1 outside), not with fc1 inside (2 x 32 MiB of W1 and 64 MiB of dW1).
    assert cffn_pallas.fits((8, 196, 4096), 256, 256, 2)
    assert not cffn_pallas.fits((8, 196, 4096), 256, 256, 2, cin=4096)


def test_gelu_in_the_kernels_is_timms():
    """The kernels' GELU is written with erf (Mosaic has no erfc); it is the same function, to
    float32 rounding (``1 + erf`` cancels for large negative inputs, where GELU is ~0)."""
    x = jnp.linspace(-6.0, 6.0, 1001)
    gelu = ACTIVATIONS["gelu"]
    np.testing.assert_allclose(cffn_pallas.kernel_activation(gelu)(x), gelu(x), atol=1e-6)
    assert cffn_pallas.kernel_activation(ACTIVATIONS["relu"]) is ACTIVATIONS["relu"]


@pytest.mark.parametrize("layout,act", [("tokens", "gelu"), pytest.param("maps", "relu", marks=pytest.mark.slow),
                                        pytest.param("maps_7x7", "relu", marks=pytest.mark.slow),
                                        ("dwconv", "gelu")])
def test_kernels_compile_for_tpu_deviceless(layout, act):
    """Mosaic lowering and XLA:TPU compile (v5e, one chip) of a cFFN train step with
    ``impl="pallas"``: DeiT-S's tokens (GELU) through the kernels with fc1 inside, PVTv2's FFN (a
    depthwise conv after fc1, 28x28) through the ones after it, NextViT's 14x14 maps (ReLU, 128
    images) through the lanes kernels, with no ``[..., r, c']`` branch outputs in HBM; NextViT's
    7x7 maps through the accel form (`_pallas_applies`)."""
    pytest.importorskip("libtpu", reason="libtpu absent: pip install 'jax[tpu]' to compile for TPU")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    sharding = NamedSharding(Mesh(np.array(devices[:1]), ("x",)), PartitionSpec())
    shape, hidden, kw = {"tokens": ((8, 197, 384), 4 * 384, {}), "maps": ((128, 14, 14, 384), 3 * 384, {}),
                         "maps_7x7": ((128, 7, 7, 768), 3 * 768, {}),
                         "dwconv": ((8, 784, 128), 8 * 128, {"grid": (28, 28)})}[layout]
    module = mlp_module.CompactMlp(hidden, act=act, impl="pallas", dtype=jnp.bfloat16, use_dwconv=bool(kw))
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, *shape[1:])), train=True, **kw))

    def step(variables, x):
        def loss(params):
            out, upd = module.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"], **kw)
            return jnp.sum(out.astype(jnp.float32)), upd
        return jax.grad(loss, has_aux=True)(variables["params"])

    sds = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), t)  # noqa: E731
    text = jax.jit(step).lower(sds(variables), jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding)
                               ).compile().as_text()
    if layout == "maps_7x7":
        assert not any(k in text for k in ("cffn_stats", "cffn_grad", "cffn_fc1_", "cffn_lanes", "tpu_custom_call"))
        return
    prefix = {"tokens": "cffn_fc1_", "maps": "cffn_lanes_fc1_", "dwconv": "cffn_"}[layout]
    assert f"{prefix}stats" in text and f"{prefix}grad" in text
    width = variables["params"]["fc2a"]["branch_kernel"].shape[-1]
    assert f"{shape[-2]},2,{width}]" not in text  # the branch outputs [..., tokens, 2, c'] never exist
