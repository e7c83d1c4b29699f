"""The accelerator hMHSA cores (`attention_accel.hmhsa_core`, the XLA formulation;
`kernels.hmhsa_pallas.hmhsa_core`, the Mosaic kernel, and `kernels.hmhsa_triton.hmhsa_core`, the
Triton kernels, both in interpret mode) against the plain path: values and gradients (q', k', v
and every IHH/CHH weight), every variant, with and without a class token, DeiT-like (N = Nk) and
reduced-key (N > Nk, a partial last query block) shapes; and a deviceless XLA:TPU (Mosaic)
compile of the kernel, forward and backward, where libtpu is installed.

The reference core is the plain `hmhsa`'s body (`attention.hallucinate` on ``[B, N, hr, Nk]``
logits, concatenation, one softmax), computed in float32.
"""

from __future__ import annotations

import functools
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from halluvit_jax.layers import attention, attention_accel
from halluvit_jax.layers.config import trace_target
from halluvit_jax.layers.kernels import hmhsa_pallas, hmhsa_triton

VARIANTS = ("copy", "ihh", "chh", "ihh_chh", "chh_ihh")
# name: (B, N, Nk, kv_grid, prefix tokens, hr, d, query block)
CASES = {
    "deit": (2, 10, 10, (3, 3), 1, 2, 8, None),  # class token + 3x3 keys, N = Nk
    "reduced": (2, 20, 12, (3, 4), 0, 1, 8, 8),  # 20 queries over 3x4 keys, blocks 8+8+4
}
# For the Triton kernels (blocks of at least 16): 3 real heads of 20 channels (tiles of 32, the
# rest masked), 37 queries over a class token + 5x6 keys: 3 query blocks of 16 (the last
# partial), 2 key blocks of 16 in the dk/dv kernel.
TRITON_CASES = {**CASES, "blocks": (2, 37, 31, (5, 6), 1, 3, 20, 16)}
# One real head and a class token (a 2-head DeiT): the ONNX trace's one-head layout with the
# hallucination's bias, which only prefix keys make visible to the softmax.
ALL_CASES = {**TRITON_CASES, "one_head_cls": (2, 10, 10, (3, 3), 1, 1, 8, None)}


def plain_core(q, k, v, params, *, variant, kv_grid, num_prefix_tokens):
    real = jnp.einsum("bnhd,bmhd->bnhm", q, k) / math.sqrt(q.shape[-1])
    hal = attention.hallucinate(real, params, variant, kv_grid, num_prefix_tokens)
    attn = jax.nn.softmax(jnp.concatenate([real, hal], axis=2), axis=-1)
    return jnp.einsum("bnhm,bmhd->bnhd", attn, v)


def make_inputs(case, variant, seed=0):
    b, n, nk, _, _, hr, d, _ = ALL_CASES[case]
    ks = jax.random.split(jax.random.key(seed), 8)
    q = jax.random.normal(ks[0], (b, n, hr, d))
    k = jax.random.normal(ks[1], (b, nk, hr, d))
    v = jax.random.normal(ks[2], (b, nk, 2 * hr, d))
    params = {"ihh_kernel": 0.5 * jax.random.normal(ks[3], (hr, 3, 3)),
              "ihh_bias": jax.random.normal(ks[4], (hr,)),
              "chh_kernel": 0.7 * jax.random.normal(ks[5], (hr, hr)),
              "chh_bias": jax.random.normal(ks[6], (hr,))}
    params = {name: p for name, p in params.items() if name.split("_")[0] in variant}
    g = jax.random.normal(ks[7], (b, n, 2 * hr, d))
    return (q, k, v, params), g


def static(case, variant):
    _, _, _, grid, prefix, _, _, _ = ALL_CASES[case]
    return dict(variant=variant, kv_grid=grid, num_prefix_tokens=prefix)


def values_and_grads(core, args, g):
    def loss(*a):
        return jnp.sum(core(*a) * g)

    return jax.jit(lambda *a: (core(*a), jax.grad(loss, argnums=(0, 1, 2, 3))(*a)))(*args)


def assert_matches(got, want):
    out, grads = got
    ref_out, ref_grads = want
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(ref_grads))
    for path, a, b_ in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads),
                           jax.tree.leaves(ref_grads)):
        # Uniform biases get a zero gradient up to rounding (softmax is shift invariant): an
        # absolute tolerance on the scale of all gradients.
        np.testing.assert_allclose(a, b_, atol=1e-5 * scale, rtol=1e-4, err_msg=str(path[0]))


XLA_FAST = {("deit", "ihh_chh"), ("reduced", "chh_ihh")}


@pytest.mark.parametrize("case,variant", [
    pytest.param(c, v, marks=() if (c, v) in XLA_FAST else pytest.mark.slow)
    for c in sorted(CASES) for v in VARIANTS])
def test_xla_core_matches_plain(case, variant):
    args, g = make_inputs(case, variant)
    st = static(case, variant)
    assert_matches(values_and_grads(functools.partial(attention_accel.hmhsa_core, **st), args, g),
                   values_and_grads(functools.partial(plain_core, **st), args, g))


@pytest.mark.parametrize("variant", ["chh", "ihh_chh"])
def test_xla_core_with_chh_as_one_matmul_matches_plain(variant):
    """``trace_target("onnx")`` (the ONNX export's CHH): one more dot_general in the traced core
    (the [hr, hr] mix) and the plain path's values and gradients."""
    args, g = make_inputs("deit", variant)
    st = static("deit", variant)
    core = functools.partial(attention_accel.hmhsa_core, **st)

    def dots():  # a fresh function: jax reuses the trace of one it has seen (the target is not in its key)
        jaxpr = jax.make_jaxpr(lambda *a: core(*a))(*args).jaxpr
        return sum(e.primitive.name == "dot_general" for e in jaxpr.eqns)

    scalars = dots()
    with trace_target("onnx"):
        assert dots() == scalars + 1
        got = values_and_grads(core, args, g)
    assert_matches(got, values_and_grads(functools.partial(plain_core, **st), args, g))
    with pytest.raises(ValueError, match="trace_target must be one of"):
        with trace_target("tflite"):
            pass


def _onnx_jaxpr(case, variant, args):
    """The core traced for ONNX (a fresh function: jax reuses the trace of one it has seen)."""
    with trace_target("onnx"):
        return jax.make_jaxpr(lambda *a: attention_accel.hmhsa_core(*a, **static(case, variant)))(*args).jaxpr


def _assert_onnx_trace_matches_plain(case, variant, args, g):
    """The core traced for ONNX gives the plain path's values and gradients."""
    st = static(case, variant)
    with trace_target("onnx"):
        got = values_and_grads(functools.partial(attention_accel.hmhsa_core, **st), args, g)
    assert_matches(got, values_and_grads(functools.partial(plain_core, **st), args, g))


@pytest.mark.parametrize("variant", ["ihh", "ihh_chh"])
def test_onnx_trace_without_prefix_keys_skips_map_passes(variant):
    """``trace_target("onnx")`` with no prefix keys and one hal head (PVTv2's and NextViT's
    reduced-key layers): CHH's 1x1 mix folded into IHH's keys (no dot_general for it), no bias
    added over the ``[B, 1, N, Nk]`` hallucinated maps (the softmax ignores a per-head constant),
    and still the plain path's values and gradients, biases included."""
    args, g = make_inputs("reduced", variant)
    b, n, nk = CASES["reduced"][:3]
    jaxpr = _onnx_jaxpr("reduced", variant, args)
    dots = lambda jaxpr: sum(e.primitive.name == "dot_general" for e in jaxpr.eqns)  # noqa: E731
    # The mix adds no matmul to IHH's: as many dot_generals as the IHH-only core.
    assert dots(jaxpr) == dots(_onnx_jaxpr("reduced", "ihh", make_inputs("reduced", "ihh")[0])), jaxpr
    map_adds = [e for e in jaxpr.eqns if e.primitive.name == "add"
                and tuple(e.outvars[0].aval.shape) == (b, 1, n, nk)]
    assert not map_adds, map_adds
    _assert_onnx_trace_matches_plain("reduced", variant, args, g)


@pytest.mark.parametrize("case", ["reduced", "one_head_cls"])
@pytest.mark.parametrize("variant", ["ihh", "chh", "ihh_chh"])
def test_onnx_trace_of_one_real_head_is_one_attention(variant, case):
    """One real head (PVTv2's and NextViT's reduced-key layers) traced for ONNX: the real and the
    hallucinated keys joined along the key axis, then one logits matmul writing ``[B, N, 2, Nk]``,
    one softmax, and one ``attn @ v`` against block-diagonal ``v`` writing ``[B, N, 2 d]``;
    nothing transposed, joined or split at the size of the maps or the output (an add over the
    maps only for the bias that prefix keys make visible); the values and gradients of the plain
    path."""
    args, g = make_inputs(case, variant)
    b, n, nk, _, prefix, hr, d, _ = ALL_CASES[case]
    assert hr == 1
    eqns = _onnx_jaxpr(case, variant, args).eqns
    prims = [e.primitive.name for e in eqns]
    assert prims.count("dot_general") == 2 and prims.count("exp") == 1, prims
    big = [e.primitive.name for e in eqns if e.primitive.name in ("concatenate", "slice", "add", "transpose")
           and math.prod(e.outvars[0].aval.shape) > b * 2 * d * nk]
    assert big == (["add"] if prefix else []), big
    out = [e for e in eqns if e.primitive.name == "dot_general"][-1]
    assert out.outvars[0].aval.shape == (b, n, 2 * d), out  # heads already side by side
    _assert_onnx_trace_matches_plain(case, variant, args, g)


def test_onnx_trace_convolves_the_keys_channels_first():
    """Several real heads and a class token (DeiT) traced for ONNX: the keys transposed once,
    to ``[B, hr, d, Nk]``, and IHH a channels-first convolution of their grid columns, so the
    only transposes are those of q', k', v and the output (the NHWC convolution had three more)."""
    args, g = make_inputs("deit", "ihh_chh")
    eqns = _onnx_jaxpr("deit", "ihh_chh", args).eqns
    convs = [e for e in eqns if e.primitive.name == "conv_general_dilated"]
    assert len(convs) == 1
    dn = convs[0].params["dimension_numbers"]
    assert tuple(dn.lhs_spec) == (0, 1, 2, 3) and tuple(dn.out_spec) == (0, 1, 2, 3)  # NCHW in and out
    moved = [e.invars[0].aval.shape for e in eqns if e.primitive.name == "transpose" and e.invars[0].aval.ndim == 4]
    assert len(moved) == 4, moved  # (CHH's [hr, hr] mix has its own, which the MatMul plan absorbs)
    _assert_onnx_trace_matches_plain("deit", "ihh_chh", args, g)


def test_mhsa_traced_for_onnx_is_two_matmuls_around_one_softmax():
    """MHSA under ``trace_target("onnx")``: no library attention call, the scale on q, logits
    ``[B, h, N, Nk]`` straight into the softmax; the values of ``jax.nn.dot_product_attention``'s
    path (and of a float64 NumPy reference) with and without reduced keys."""
    rng = np.random.default_rng(0)
    b, n, nk, h, d = 2, 7, 5, 3, 4
    c = h * d
    p = {part: {"kernel": jnp.asarray(rng.normal(size=(c, c)), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=(c,)), jnp.float32)} for part in ("q", "k", "v", "proj")}
    x = jnp.asarray(rng.normal(size=(b, n, c)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(b, nk, c)), jnp.float32)

    def numpy_mhsa(x, kv):
        x, src = np.float64(x), np.float64(x if kv is None else kv)
        heads = lambda part, t: (t @ p[part]["kernel"] + p[part]["bias"]).reshape(b, -1, h, d)  # noqa: E731
        logits = np.einsum("bnhd,bmhd->bhnm", heads("q", x), heads("k", src)) / math.sqrt(d)
        attn = np.exp(logits - logits.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        out = np.einsum("bhnm,bmhd->bnhd", attn, heads("v", src)).reshape(b, n, c)
        return out @ p["proj"]["kernel"] + p["proj"]["bias"]

    for keys in (None, kv):
        fn = lambda x, kv: attention.mhsa(p, x, kv, num_heads=h)  # noqa: E731
        default = fn(x, keys)
        with trace_target("onnx"):
            text = jax.jit(lambda x, kv: fn(x, kv)).lower(x, keys).as_text()
            onnx_form = jax.jit(lambda x, kv: fn(x, kv))(x, keys)
        maps = f"tensor<{b}x{h}x{n}x{n if keys is None else nk}xf32>"  # heads leading
        ops_on_maps = re.findall(rf"(stablehlo\.\w+)[^\n]*[:>] {maps}$", text, re.M)
        assert ops_on_maps.count("stablehlo.exponential") == 1, ops_on_maps
        assert "stablehlo.multiply" not in ops_on_maps and "stablehlo.transpose" not in ops_on_maps, ops_on_maps
        np.testing.assert_allclose(onnx_form, default, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(onnx_form, numpy_mhsa(x, keys), rtol=2e-4, atol=2e-4)


PALLAS_FAST = {("deit", "ihh_chh"), ("reduced", "chh_ihh"), ("reduced", "ihh")}


@pytest.mark.parametrize("case,variant", [
    pytest.param(c, v, marks=() if (c, v) in PALLAS_FAST else pytest.mark.slow)
    for c in sorted(CASES) for v in VARIANTS])
def test_pallas_core_matches_plain(case, variant):
    """Interpret mode: the kernels' own code (rolls, per-column weights, the recomputing
    backward with its accumulation over query blocks) on CPU."""
    args, g = make_inputs(case, variant)
    st = static(case, variant)
    core = functools.partial(hmhsa_pallas.hmhsa_core, interpret=True, block_q=CASES[case][-1], **st)
    assert_matches(values_and_grads(core, args, g),
                   values_and_grads(functools.partial(plain_core, **st), args, g))


@pytest.mark.slow  # ~8 s; the fast tier keeps the XLA and Pallas cores
def test_accel_hmhsa_layer_matches_plain_hmhsa():
    """The whole layer (projections included) with the `hmhsa` signature: reduced keys from
    ``kv``, the Mosaic and the Triton cores in interpret mode, against `attention.hmhsa`."""
    b, n, nk, c, h = 2, 12, 6, 16, 4
    ks = jax.random.split(jax.random.key(3), 10)
    dense = lambda key, i, o: {"kernel": 0.3 * jax.random.normal(key, (i, o)),  # noqa: E731
                               "bias": 0.1 * jax.random.normal(jax.random.fold_in(key, 1), (o,))}
    p = {"q": dense(ks[0], c, c // 2), "kv": dense(ks[1], c, c // 2 + c), "proj": dense(ks[2], c, c),
         "ihh_kernel": jax.random.normal(ks[3], (2, 3, 3)), "ihh_bias": jax.random.normal(ks[4], (2,)),
         "chh_kernel": jax.random.normal(ks[5], (2, 2)), "chh_bias": jax.random.normal(ks[6], (2,))}
    p = attention.per_head_views(p, (c // 2, c // 2, c), c // h)  # as HalAttention hands them over
    x, kv = jax.random.normal(ks[7], (b, n, c)), jax.random.normal(ks[8], (b, nk, c))
    kw = dict(num_heads=h, variant="ihh_chh", kv_grid=(2, 3), num_prefix_tokens=0)
    want = attention.hmhsa(p, x, kv, **kw)
    for kernels in (hmhsa_pallas, hmhsa_triton):
        core = functools.partial(kernels.hmhsa_core, interpret=True)
        got = jax.jit(lambda p, x, kv: attention.hmhsa_on_core(core, p, x, kv, **kw))(p, x, kv)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=kernels.__name__)
    # impl="pallas" on CPU runs the same kernel in the interpreter.
    np.testing.assert_allclose(jax.jit(lambda p, x, kv: attention.hmhsa_pallas_impl(p, x, kv, **kw))(p, x, kv),
                               want, atol=1e-5, rtol=1e-5)


TRITON_FAST = {("blocks", "ihh_chh"), ("blocks", "chh_ihh"), ("reduced", "chh")}


@pytest.mark.parametrize("case,variant", [
    pytest.param(c, v, marks=() if (c, v) in TRITON_FAST else pytest.mark.slow)
    for c in sorted(TRITON_CASES) for v in VARIANTS])
def test_triton_core_matches_plain(case, variant):
    """Interpret mode: the Triton kernels' own code (masked loads and stores at the ends of the
    token axes and the head dim, the forward's log-sum-exp feeding both backward kernels, the
    dk/dv kernel's loop over query blocks, the per-column bias and CHH partial sums) on CPU."""
    args, g = make_inputs(case, variant)
    st = static(case, variant)
    block = TRITON_CASES[case][-1]
    core = functools.partial(hmhsa_triton.hmhsa_core, interpret=True, block_q=block and max(16, block),
                             block_k=block and 16, **st)
    assert_matches(values_and_grads(core, args, g),
                   values_and_grads(functools.partial(plain_core, **st), args, g))


def test_triton_core_takes_at_most_four_real_heads():
    """More real heads would not fit a program's registers (`hmhsa_triton.MAX_REAL_HEADS`): the
    core refuses them with the way out, and `supports` says so (the CUDA dispatch reads it)."""
    q = jnp.zeros((1, 9, 5, 16))
    k, v = jnp.zeros((1, 9, 5, 16)), jnp.zeros((1, 9, 10, 16))
    assert not hmhsa_triton.supports(q.shape, k.shape)
    assert hmhsa_triton.supports((1, 9, 4, 16), (1, 9, 4, 16))
    with pytest.raises(ValueError, match="at most 4 real heads.*impl='accel'"):
        hmhsa_triton.hmhsa_core(q, k, v, {}, variant="copy", kv_grid=(3, 3), num_prefix_tokens=0)


def test_pallas_core_rejects_long_key_rows():
    args, _ = make_inputs("deit", "copy")
    q, _, _, _ = args
    with pytest.raises(ValueError, match="whole key row"):
        hmhsa_pallas.hmhsa_core(q, jnp.zeros((2, 600, 2, 8)), jnp.zeros((2, 600, 4, 8)), {},
                                variant="copy", kv_grid=(20, 30), num_prefix_tokens=0)


def _tpu_pallas_setup(b, n, nk, hr, d, prefix):
    """One v5e chip (deviceless), bf16 abstract ``q', k', v`` and IHH/CHH weights, and the
    Pallas core (ihh_chh over a 7x7 key grid)."""
    pytest.importorskip("libtpu", reason="libtpu absent: pip install 'jax[tpu]' to compile for TPU")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    sharding = NamedSharding(Mesh(np.array(devices[:1]), ("x",)), PartitionSpec())
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sharding)  # noqa: E731
    params = {"ihh_kernel": sds(hr, 3, 3), "ihh_bias": sds(hr), "chh_kernel": sds(hr, hr),
              "chh_bias": sds(hr)}
    core = functools.partial(hmhsa_pallas.hmhsa_core, variant="ihh_chh", kv_grid=(7, 7),
                             num_prefix_tokens=prefix)
    return sds, params, core


def test_pallas_core_compiles_for_tpu_deviceless():
    """Mosaic lowering and XLA:TPU compile of the forward and backward kernels (v5e, one chip)
    at DeiT-like shapes, no TPU needed: the kernel moves only its operands (q', k', v, the
    output; no logits) through HBM."""
    b, n, nk, hr, d = 4, 50, 50, 2, 64
    sds, params, core = _tpu_pallas_setup(b, n, nk, hr, d, prefix=1)

    def train(q, k, v, p, g):
        return jax.vjp(core, q, k, v, p)[1](g)

    args = (sds(b, n, hr, d), sds(b, nk, hr, d), sds(b, nk, 2 * hr, d), params)
    fwd = jax.jit(core).lower(*args).compile()
    bwd = jax.jit(train).lower(*args, sds(b, n, 2 * hr, d)).compile()
    for compiled, name in ((fwd, "hmhsa_fwd"), (bwd, "hmhsa_bwd")):
        text = compiled.as_text()
        assert "tpu_custom_call" in text and name in text
        assert f"f32[{b},{n},{nk}]" not in text and f"bf16[{b},{n},{nk}]" not in text  # no maps


@pytest.mark.slow  # ~7 s of Mosaic compile
def test_pallas_backward_fits_vmem_at_nextvit_stage_1():
    """NextViT-S stage 1 (784 queries over 7x7 keys, 3 real heads of 32 channels): with all 784
    rows in one block the backward kernel overflowed v5e's scoped VMEM at compile time; its
    query blocks are now capped per real head (`hmhsa_pallas.backward_block`)."""
    assert hmhsa_pallas.query_block(784) == 784 and hmhsa_pallas.backward_block(784, 3) == 112
    b, n, nk, hr, d = 8, 784, 49, 3, 32
    sds, params, core = _tpu_pallas_setup(b, n, nk, hr, d, prefix=0)
    args = (sds(b, n, hr, d), sds(b, nk, hr, d), sds(b, nk, 2 * hr, d), params, sds(b, n, 2 * hr, d))
    text = jax.jit(lambda q, k, v, p, g: jax.vjp(core, q, k, v, p)[1](g)).lower(*args).compile().as_text()
    assert "hmhsa_bwd" in text


@pytest.mark.slow  # ~17 s: the layer through the interpreted kernel; the fast tier keeps the core
def test_hal_attention_with_impl_pallas_matches_plain():
    """The layer as models build it (`HalAttention(impl="pallas")`, class token, DeiT-like key
    grid): values and gradients equal to ``impl="plain"`` (the kernel runs interpreted on CPU)."""
    make = lambda impl: attention.HalAttention(32, 4, variant="ihh_chh", hal_init="random", impl=impl)  # noqa: E731
    x = jax.random.normal(jax.random.key(5), (2, 1 + 3 * 4, 32))
    kw = dict(kv_grid=(3, 4), num_prefix_tokens=1)
    variables = make("plain").init(jax.random.key(6), x, **kw)

    def loss(impl, v, x):
        return jnp.sum(jnp.sin(make(impl).apply(v, x, **kw)))

    # The kernel really runs (a layer that ignored impl="pallas" would run plain and compare equal).
    assert "pallas_call" in str(jax.make_jaxpr(functools.partial(loss, "pallas"))(variables, x))
    assert "pallas_call" not in str(jax.make_jaxpr(functools.partial(loss, "plain"))(variables, x))
    want = jax.value_and_grad(functools.partial(loss, "plain"), argnums=(0, 1))(variables, x)
    got = jax.jit(jax.value_and_grad(functools.partial(loss, "pallas"), argnums=(0, 1)))(variables, x)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    for g, w in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(want[1])):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["deit", "reduced"])
def test_hal_attention_with_impl_accel_matches_plain(case):
    """``impl="accel"`` (what ``"auto"`` runs on CUDA): the layer as models build it, with a class
    token and N = Nk, or on reduced keys (N > Nk): values and gradients (x, kv and every
    parameter) equal to ``impl="plain"``, and the accel core really runs (IHH as a depthwise
    convolution of the keys, one group per channel of q' (hr * d = 16 groups), where the plain
    path convolves the logit maps (hr = 2 groups))."""
    make = lambda impl: attention.HalAttention(32, 4, variant="ihh_chh", hal_init="random", impl=impl)  # noqa: E731
    if case == "deit":
        xs = (jax.random.normal(jax.random.key(5), (2, 1 + 3 * 4, 32)),)
        kw = dict(kv_grid=(3, 4), num_prefix_tokens=1)
    else:
        xs = (jax.random.normal(jax.random.key(5), (2, 20, 32)),
              jax.random.normal(jax.random.key(7), (2, 12, 32)))
        kw = dict(kv_grid=(3, 4), num_prefix_tokens=0)
    variables = make("plain").init(jax.random.key(6), *xs, **kw)

    def loss(impl, v, *xs):
        return jnp.sum(jnp.sin(make(impl).apply(v, *xs, **kw)))

    argnums = tuple(range(len(xs) + 1))
    on_keys = "feature_group_count=16"
    assert on_keys not in str(jax.make_jaxpr(functools.partial(loss, "plain"))(variables, *xs))
    assert on_keys in str(jax.make_jaxpr(functools.partial(loss, "accel"))(variables, *xs))
    want = jax.value_and_grad(functools.partial(loss, "plain"), argnums=argnums)(variables, *xs)
    got = jax.jit(jax.value_and_grad(functools.partial(loss, "accel"), argnums=argnums))(variables, *xs)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    leaves = lambda t: jax.tree_util.tree_leaves(t)  # noqa: E731
    assert len(leaves(got[1])) == len(leaves(want[1])) > 8
    for g, w in zip(leaves(got[1]), leaves(want[1])):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
