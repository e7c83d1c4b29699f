"""The memory-lean custom VJPs of the transformer block (`halluvit_jax.layers.fused`): the fused
FFN (`dense_act_dense`), the attention core (`recomputing_attention`), the deferred LayerNorm,
CHH, BatchNorm and the cFFN's RepDense equal the float64 NumPy references of
tests/reference_numpy.py (the textbook formulas; gradients by central differences in float64),
values to 1e-5 and gradients to 1e-4 of their scale, and keep less activation memory across a
stack of layers than plain autodiff (XLA's compile-time memory analysis, which is deterministic
for a given program). The layers built on them are checked on both paths (``impl="plain"`` and
``impl="fused"``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_numpy as ref

from halluvit_jax.layers.fused import dense_act_dense, gelu_exact
from halluvit_jax.layers.fused import recomputing_attention as dot_product_attention

IMPLS = ["plain", "fused"]
# The fast tier checks the fused path here (what this file is about); the plain path against
# the same references runs in the slow tier and, layer by layer, in test_layers.py.
IMPLS_FAST_FUSED = [pytest.param("plain", marks=pytest.mark.slow), "fused"]
RTOL, RTOL_GRAD = 1e-5, 1e-4  # float32 against float64, relative to the array's scale


def _autodiff_attention(q, k, v):
    """The textbook attention in jax: what plain autodiff keeps (the memory baseline)."""
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(logits, axis=-1), v)


def _rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _check_grads(got, f, args, cotangent, names=None):
    """``got`` (jax gradients of ``sum(ours(*args) * cotangent)``, in ``args``' order) against
    float64 central differences of the NumPy reference ``f``."""
    want = ref.numeric_grad(f, args, range(len(args)), cotangent)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        ref.assert_close(g, w, RTOL_GRAD, f"d/d{names[i] if names else i}")


def _ffn_params(key, c, h):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return (jax.random.normal(k1, (c, h)) * 0.2, jax.random.normal(k2, (h,)) * 0.1,
            jax.random.normal(k3, (h, c)) * 0.2, jax.random.normal(k4, (c,)) * 0.1)


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_dense_act_dense_values_and_grads_match_the_reference(act):
    fused_act, ref_act = {"gelu": (gelu_exact, ref.gelu), "relu": (jax.nn.relu, ref.relu)}[act]
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))  # any leading axes (NHWC maps too)
    params = _ffn_params(jax.random.key(1), 8, 24)
    w = jax.random.normal(jax.random.key(2), x.shape)
    fused = lambda *a: dense_act_dense(*a, fused_act)  # noqa: E731
    want = lambda x, *p: ref.ffn(x, *p, act=ref_act)  # noqa: E731
    ref.assert_close(fused(x, *params), want(x, *params), RTOL)
    grads = jax.grad(lambda *a: jnp.sum(fused(*a) * w), argnums=range(5))(x, *params)
    _check_grads(grads, want, (x, *params), w, ("x", "w1", "b1", "w2", "b2"))


def test_attention_core_values_and_grads_match_the_reference():
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (2, 7, 3, 8)) * 2  # peaked maps exercise the log-sum-exp
    k = jax.random.normal(ks[1], (2, 5, 3, 8)) * 2
    v = jax.random.normal(ks[2], (2, 5, 3, 8))
    w = jax.random.normal(ks[3], (2, 7, 3, 8))
    ref.assert_close(dot_product_attention(q, k, v), ref.attention(q, k, v), RTOL)
    grads = jax.grad(lambda *a: jnp.sum(dot_product_attention(*a) * w), argnums=(0, 1, 2))(q, k, v)
    _check_grads(grads, ref.attention, (q, k, v), w, "qkv")


def test_attention_core_bfloat16_stays_close_to_float32():
    ks = jax.random.split(jax.random.key(3), 3)
    q, k, v = (jax.random.normal(kk, (2, 9, 2, 16)) for kk in ks)
    out = dot_product_attention(*(t.astype(jnp.bfloat16) for t in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    ref.assert_close(out.astype(jnp.float32), ref.attention(q, k, v), 3e-2)


def _stack_temp_bytes(layer, params, x, depth):
    def loss(params, x):
        for _ in range(depth):
            x = x + layer(x, *params)
        return jnp.sum(jnp.sin(x))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_fused_ffn_keeps_less_activation_memory_than_autodiff():
    # 6 residual FFNs, tokens 1024 x 64 -> hidden 256: autodiff keeps x, the pre-activation and
    # the activation per layer (1.5 MiB of hidden-sized tensors); the fused VJP drops the latter.
    x = jax.ShapeDtypeStruct((4, 256, 64), jnp.float32)
    params = _ffn_params(jax.random.key(0), 64, 256)
    plain = lambda x, *p: gelu_exact(x @ p[0] + p[1]) @ p[2] + p[3]  # noqa: E731
    fused = lambda x, *p: dense_act_dense(x, *p, gelu_exact)  # noqa: E731
    per_layer_plain = (_stack_temp_bytes(plain, params, x, 6) - _stack_temp_bytes(plain, params, x, 2)) / 4
    per_layer_fused = (_stack_temp_bytes(fused, params, x, 6) - _stack_temp_bytes(fused, params, x, 2)) / 4
    hidden_bytes = 4 * 256 * 256 * 4
    assert per_layer_plain - per_layer_fused >= 0.9 * hidden_bytes, (per_layer_plain, per_layer_fused)


def test_attention_core_keeps_less_activation_memory_than_autodiff():
    # Maps [4, 4, 256, 256] float32 (4 MiB) per layer are not kept by the custom VJP.
    x = jax.ShapeDtypeStruct((4, 256, 4, 16), jnp.float32)

    def layer(impl):
        return lambda x: impl(x * 0.5, x * 0.25, x)

    def temp(impl, depth):
        return _stack_temp_bytes(lambda x: layer(impl)(x), (), x, depth)

    per_layer_plain = (temp(_autodiff_attention, 6) - temp(_autodiff_attention, 2)) / 4
    per_layer_fused = (temp(dot_product_attention, 6) - temp(dot_product_attention, 2)) / 4
    maps_bytes = 4 * 4 * 256 * 256 * 4
    assert per_layer_plain - per_layer_fused >= 0.9 * maps_bytes, (per_layer_plain, per_layer_fused)


@pytest.mark.parametrize("impl", IMPLS_FAST_FUSED)
def test_mlp_module_uses_dense_params_and_matches_the_textbook_ffn(impl):
    """`Mlp` keeps nn.Dense's param tree and equals gelu(x W1 + b1) W2 + b2, values and
    gradients, in eval and in train mode (drop 0: the `impl` path is taken in both)."""
    from halluvit_jax.layers import Mlp

    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    m = Mlp(hidden_features=24, impl=impl)
    v = m.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, v["params"]) == {
        "fc1": {"kernel": (8, 24), "bias": (24,)}, "fc2": {"kernel": (24, 8), "bias": (8,)}}
    p = jax.tree.map(lambda t: t + 0.05 * jax.random.normal(jax.random.key(2), t.shape), v)["params"]
    flat = (p["fc1"]["kernel"], p["fc1"]["bias"], p["fc2"]["kernel"], p["fc2"]["bias"])
    ref.assert_close(m.apply({"params": p}, x), ref.ffn(x, *flat), RTOL)
    w = jax.random.normal(jax.random.key(3), x.shape)
    got = jax.grad(lambda p, x: jnp.sum(m.apply({"params": p}, x, train=True) * w), (0, 1))(p, x)
    leaves = (got[0]["fc1"]["kernel"], got[0]["fc1"]["bias"], got[0]["fc2"]["kernel"],
              got[0]["fc2"]["bias"], got[1])
    _check_grads(leaves, lambda *a: ref.ffn(a[-1], *a[:-1]), (*flat, x), w,
                 ("fc1.kernel", "fc1.bias", "fc2.kernel", "fc2.bias", "x"))


@pytest.mark.parametrize("impl", IMPLS_FAST_FUSED)
def test_attention_module_fused_and_sowing_paths_agree(impl):
    """`Attention` takes its `impl` path (fused: the recomputing core) unless its maps are asked
    for (intermediates mutable: the plain path with the maps); both give the same output and
    gradients, and the sown maps are the softmax of the textbook logits."""
    from halluvit_jax.layers import Attention

    x = jax.random.normal(jax.random.key(0), (2, 6, 16)) * 2
    m = Attention(16, 4, impl=impl)
    v = jax.jit(m.init)(jax.random.key(1), x)
    fused = jax.jit(lambda v, x: m.apply(v, x, train=True))
    sowing = jax.jit(lambda v, x: m.apply(v, x, train=True, mutable=["intermediates"])[0])
    np.testing.assert_allclose(fused(v, x), sowing(v, x), rtol=1e-5, atol=1e-6)
    w = jax.random.normal(jax.random.key(2), x.shape)
    g1 = jax.grad(lambda v, x: jnp.sum(fused(v, x) * w), (0, 1))(v, x)
    g2 = jax.grad(lambda v, x: jnp.sum(sowing(v, x) * w), (0, 1))(v, x)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert _rel_err(a, b) < 1e-5
    _, state = jax.jit(lambda v, x: m.apply(v, x, mutable=["intermediates"]))(v, x)
    (maps,) = state["intermediates"]["attn"]
    qkv = ref.f64(x) @ ref.f64(v["params"]["qkv"]["kernel"]) + ref.f64(v["params"]["qkv"]["bias"])
    q, k = (t.reshape(2, 6, 4, 4) for t in np.split(qkv, 3, axis=-1)[:2])
    ref.assert_close(maps, ref.softmax(np.einsum("bnhd,bmhd->bhnm", q, k) / 2.0), RTOL)


# The fast tier checks the default and the identity variant; tests/test_impl_equivalence.py
# compares every variant's fused and plain paths in both tiers.
@pytest.mark.parametrize("variant", [pytest.param("copy", marks=pytest.mark.slow), pytest.param("ihh", marks=pytest.mark.slow),
                                     pytest.param("chh", marks=pytest.mark.slow), "ihh_chh",
                                     pytest.param("chh_ihh", marks=pytest.mark.slow)])
def test_hal_attention_recomputing_core_matches_the_plain_path(variant):
    """hMHSA through the recomputing core (IHH/CHH rebuilt in the backward pass) gives the same
    output and gradients, IHH/CHH kernels included, as the plain path that keeps every map."""
    from halluvit_jax.layers import HalAttention

    x = jax.random.normal(jax.random.key(0), (2, 1 + 12, 16)) * 2
    kw = {"kv_grid": (3, 4), "num_prefix_tokens": 1, "train": True}
    m = HalAttention(16, 4, variant=variant, hal_init="random", impl="fused")
    v = m.init(jax.random.key(1), x, **kw)
    fused = lambda v, x: m.apply(v, x, **kw)
    plain = lambda v, x: m.apply(v, x, **kw, mutable=["intermediates"])[0]
    np.testing.assert_allclose(fused(v, x), plain(v, x), rtol=1e-5, atol=1e-6)
    w = jax.random.normal(jax.random.key(2), x.shape)
    g1 = jax.grad(lambda v, x: jnp.sum(fused(v, x) * w), (0, 1))(v, x)
    g2 = jax.grad(lambda v, x: jnp.sum(plain(v, x) * w), (0, 1))(v, x)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(g1)]
    assert any("ihh" in n or "chh" in n for n in names) or variant == "copy"
    for name, a, b in zip(names, jax.tree.leaves(g1), jax.tree.leaves(g2)):
        # chh_bias's gradient is zero up to round-off (a bias uniform over keys is invisible to
        # the softmax): compare on the scale of the largest gradient.
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * max(float(jnp.max(jnp.abs(b))), 1e-3), name


# ---------------------------------------------------------------------------------------------
# LayerNorm deferred into the next matmul (PreNorm / norm_dense / dense_act_dense(norm=...)).


def _norm_params(key, c):
    k1, k2 = jax.random.split(key)
    return 1.0 + 0.3 * jax.random.normal(k1, (c,)), 0.2 * jax.random.normal(k2, (c,))


def test_norm_dense_values_and_grads_match_layernorm_then_matmuls():
    from halluvit_jax.layers.fused import norm_dense

    ks = jax.random.split(jax.random.key(0), 6)
    x = 2.0 * jax.random.normal(ks[0], (2, 5, 8)) + 0.5
    norm = _norm_params(ks[1], 8)
    kernels = (jax.random.normal(ks[2], (8, 4)), jax.random.normal(ks[3], (8, 6)))
    bias0 = jax.random.normal(ks[4], (4,))  # the second group has no bias
    ws = (jax.random.normal(ks[5], (2, 5, 4)), jax.random.normal(ks[5], (2, 5, 6)))

    def want(x, scale, bias, k0, k1, b0):  # both groups side by side
        y = ref.layer_norm(x, scale, bias, 1e-6)
        return np.concatenate([y @ k0 + b0, y @ k1], axis=-1)

    def fused(x, norm, kernels, bias0):
        return norm_dense(x, norm, kernels, (bias0, None), 1e-6)

    out = fused(x, norm, kernels, bias0)
    ref.assert_close(jnp.concatenate(out, axis=-1), want(x, *norm, *kernels, bias0), RTOL)
    loss = lambda *a: sum(jnp.sum(o * w) for o, w in zip(fused(*a), ws))  # noqa: E731
    got = jax.tree.leaves(jax.grad(loss, argnums=range(4))(x, norm, kernels, bias0))
    _check_grads(got, want, (x, *norm, *kernels, bias0), np.concatenate(ws, axis=-1),
                 ("x", "scale", "bias", "kernel0", "kernel1", "bias0"))


def test_dense_act_dense_with_norm_matches_layernorm_then_ffn():
    ks = jax.random.split(jax.random.key(1), 4)
    x = 3.0 * jax.random.normal(ks[0], (2, 5, 8)) - 1.0
    norm = _norm_params(ks[1], 8)
    params = _ffn_params(ks[2], 8, 24)
    w = jax.random.normal(ks[3], x.shape)
    want = lambda x, s, b, *p: ref.ffn(ref.layer_norm(x, s, b, 1e-6), *p)  # noqa: E731
    fused = lambda x, norm, *p: dense_act_dense(x, *p, gelu_exact, norm, 1e-6)  # noqa: E731
    ref.assert_close(fused(x, norm, *params), want(x, *norm, *params), RTOL)
    got = jax.tree.leaves(jax.grad(lambda *a: jnp.sum(fused(*a) * w), argnums=range(6))(x, norm, *params))
    _check_grads(got, want, (x, *norm, *params), w, ("x", "scale", "bias", "w1", "b1", "w2", "b2"))


def test_deferred_norm_keeps_one_token_tensor_per_residual_layer():
    """A stack of ``x + LN(x) @ W`` keeps, per layer, the residual ``x`` and (unfused) the norm's
    output; deferred into the matmul only ``x``. This also catches XLA sharing the token-sized
    broadcasts of mean, 1/std or scale between the forward and backward passes (each would add
    a token-sized tensor per layer)."""
    from halluvit_jax.layers.fused import layer_norm, norm_dense

    x = jax.ShapeDtypeStruct((4, 256, 64), jnp.float32)
    token_bytes = 4 * 256 * 64 * 4
    norm = _norm_params(jax.random.key(0), 64)
    kernel = jax.random.normal(jax.random.key(1), (64, 64)) * 0.1
    unfused = lambda x, s, b, k: layer_norm(x, s, b, 1e-6) @ k  # noqa: E731
    fused = lambda x, s, b, k: norm_dense(x, (s, b), (k,), (None,), 1e-6)[0]  # noqa: E731

    def per_layer(layer):
        return (_stack_temp_bytes(layer, (*norm, kernel), x, 6)
                - _stack_temp_bytes(layer, (*norm, kernel), x, 2)) / 4

    assert per_layer(fused) <= 1.25 * token_bytes, per_layer(fused) / token_bytes
    assert per_layer(unfused) <= 2.25 * token_bytes, per_layer(unfused) / token_bytes


# The fast tier: the fused path of each layer; the slow one the plain paths and cFFN-w1.
@pytest.mark.parametrize("layer,impl", [
    pytest.param(layer, impl, marks=[pytest.mark.slow] if layer == "cffn_w1" or impl == "plain" else [])
    for layer in ("attention", "hal_attention", "mlp", "cffn_w2", "cffn_w1") for impl in IMPLS])
def test_layers_given_a_deferred_norm_equal_the_norm_then_the_layer(layer, impl):
    """Every layer a DeiT block feeds with ``LayerNorm(defer=True)`` gives the values and
    gradients (params of the norm and the layer, and the input) of the materialized norm."""
    import flax.linen as nn

    from halluvit_jax.layers import Attention, CompactMlp, HalAttention, LayerNorm, Mlp

    make = {
        "attention": lambda: Attention(16, 4, impl=impl),
        "hal_attention": lambda: HalAttention(16, 4, impl=impl),
        "mlp": lambda: Mlp(48, impl=impl),
        "cffn_w2": lambda: CompactMlp(48, factorize="w2", impl=impl),
        "cffn_w1": lambda: CompactMlp(48, factorize="w1", impl=impl),
    }[layer]

    class Pre(nn.Module):
        defer: bool

        @nn.compact
        def __call__(self, x, train=True):
            kw = {"kv_grid": (3, 3), "num_prefix_tokens": 1} if "attention" in layer else {}
            return make()(LayerNorm(impl=impl, name="norm")(x, defer=self.defer), train=train, **kw)

    x = 2.0 * jax.random.normal(jax.random.key(0), (2, 10, 16)) + 0.3
    w = jax.random.normal(jax.random.key(1), x.shape)
    v = Pre(defer=False).init(jax.random.key(2), x)
    v = jax.tree.map(lambda t: t + 0.1 * jax.random.normal(jax.random.key(3), t.shape), v)
    mutable = ["batch_stats"] if "batch_stats" in v else False

    def loss(defer):
        def f(params, x):
            out = Pre(defer=defer).apply({**v, "params": params}, x, mutable=mutable)
            out = out[0] if mutable else out
            return jnp.sum(out * w), out
        return f

    (_, out_ref), g_ref = jax.value_and_grad(loss(False), argnums=(0, 1), has_aux=True)(v["params"], x)
    (_, out), g = jax.value_and_grad(loss(True), argnums=(0, 1), has_aux=True)(v["params"], x)
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
    assert jax.tree.structure(g) == jax.tree.structure(g_ref)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert _rel_err(a, b) < 1e-4


# ---------------------------------------------------------------------------------------------
# The cFFN training form: RepDense in train mode as one custom-VJP op (fused.rep_dense_bn).


def _fused_rep_dense_with_act(act):
    """`fused.rep_dense` with its optional activation (the cFFN's GELU before fc2a, fused into
    the train-mode op), on `RepDense`'s variables, updating the running statistics as flax's
    BatchNorm does (momentum 0.9). `RepDense` itself takes no activation."""
    from halluvit_jax.layers import fused

    class Ours:
        @staticmethod
        def init(key, x):
            from halluvit_jax.layers import RepDense

            return RepDense(6, num_branches=3).init(key, x)

        @staticmethod
        def apply(variables, x, train=False, mutable=False):
            stats = variables["batch_stats"]["bn"]
            v = {"branch_kernel": variables["params"]["branch_kernel"],
                 "bn": variables["params"]["bn"], "bn_mean": stats["mean"], "bn_var": stats["var"]}
            out, mean, var = fused.rep_dense(v, x, train=train, epsilon=1e-5, act=act)
            if not mutable:
                return out
            ra = lambda old, new: 0.9 * old + 0.1 * jax.lax.stop_gradient(new)  # noqa: E731
            return out, {"batch_stats": {"bn": {"mean": ra(stats["mean"], mean),
                                                "var": ra(stats["var"], var)}}}

    return Ours()


def _numpy_rep_dense(x, kernel, scale, bias, mean=None, var=None, act=None, eps=1e-5):
    """act -> r bias-free branches ``x @ kernel[r]`` -> BatchNorm over (r, out) features (this
    batch's statistics over every other axis, or the running ``mean`` / ``var``) -> sum over r.
    Returns (out, batch mean, batch variance)."""
    y = np.einsum("...i,rio->...ro", ref.f64(x) if act is None else act(x), ref.f64(kernel))
    axes = tuple(range(y.ndim - 2))
    if mean is None:
        mean, var = ref.batch_stats(y, axes)
    return ref.batch_norm(y, scale, bias, mean, var, eps).sum(axis=-2), mean, var


@pytest.mark.parametrize("case", ["plain", "fused", "fused_op_gelu"])
def test_rep_dense_train_and_eval_match_the_reference(case):
    """flax BatchNorm's variables; output, gradients (input, kernel, scale, bias) and the updated
    running statistics (momentum 0.9, biased batch variance) in train mode; output in eval mode.
    `RepDense` on both paths, and the fused op with the GELU folded in (``act``)."""
    from halluvit_jax.layers import RepDense

    fn = gelu_exact if case == "fused_op_gelu" else None
    ref_act = ref.gelu if fn else None
    ours = _fused_rep_dense_with_act(fn) if fn else RepDense(6, num_branches=3, impl=case)
    x = 2.0 * jax.random.normal(jax.random.key(0), (4, 7, 5)) + 0.5
    v = ours.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, v) == {
        "params": {"branch_kernel": (3, 5, 6), "bn": {"scale": (3, 6), "bias": (3, 6)}},
        "batch_stats": {"bn": {"mean": (3, 6), "var": (3, 6)}}}
    v = {"params": jax.tree.map(lambda t: t + 0.2 * jax.random.normal(jax.random.key(2), t.shape),
                                v["params"]),
         "batch_stats": jax.tree.map(lambda t: t + 0.5, v["batch_stats"])}
    w = jax.random.normal(jax.random.key(3), (4, 7, 6))

    def f(params, x):
        out, upd = ours.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(out * w), (out, upd["batch_stats"])

    (_, (out, stats)), (grads, dx) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(v["params"], x)
    p, old = v["params"], v["batch_stats"]["bn"]
    args = (x, p["branch_kernel"], p["bn"]["scale"], p["bn"]["bias"])
    want, mean, var = _numpy_rep_dense(*args, act=ref_act)
    ref.assert_close(out, want, RTOL, "train output")
    ref.assert_close(stats["bn"]["mean"], ref.running_average(old["mean"], mean, 0.9), RTOL, "mean")
    ref.assert_close(stats["bn"]["var"], ref.running_average(old["var"], var, 0.9), RTOL, "var")
    got = (dx, grads["branch_kernel"], grads["bn"]["scale"], grads["bn"]["bias"])
    _check_grads(got, lambda *a: _numpy_rep_dense(*a, act=ref_act)[0], args, w,
                 ("x", "branch_kernel", "scale", "bias"))
    want_eval, _, _ = _numpy_rep_dense(*args, mean=old["mean"], var=old["var"], act=ref_act)
    ref.assert_close(ours.apply(v, x), want_eval, RTOL, "eval output")


@pytest.mark.parametrize("impl", IMPLS_FAST_FUSED)
def test_cross_head_hallucination_values_and_grads_match_the_reference(impl):
    """CHH (fused: hand-written VJP, heads-first [B, H, N, Nk]; plain: einsum over
    [B, N, H, Nk]) against the head-mixing sum: maps, kernel, bias."""
    from halluvit_jax.layers import cross_head_hallucination as plain_chh
    from halluvit_jax.layers import fused

    if impl == "fused":
        cross_head_hallucination = fused.cross_head_hallucination
    else:
        def cross_head_hallucination(a, k, b):
            return jnp.swapaxes(plain_chh(jnp.swapaxes(a, 1, 2), k, b), 1, 2)

    ks = jax.random.split(jax.random.key(0), 4)
    logits = jax.random.normal(ks[0], (2, 3, 5, 7))
    kernel, bias = jax.random.normal(ks[1], (3, 2)), jax.random.normal(ks[2], (2,))
    w = jax.random.normal(ks[3], (2, 2, 5, 7))
    ref.assert_close(cross_head_hallucination(logits, kernel, bias),
                     ref.cross_head_hallucination(logits, kernel, bias), RTOL)
    got = jax.grad(lambda *a: jnp.sum(cross_head_hallucination(*a) * w), (0, 1, 2))(logits, kernel, bias)
    _check_grads(got, ref.cross_head_hallucination, (logits, kernel, bias), w, ("maps", "kernel", "bias"))


@pytest.mark.parametrize("impl", IMPLS_FAST_FUSED)
def test_batch_norm_matches_the_reference(impl):
    """`BatchNorm` (NextViT's): flax BatchNorm's variables, and the textbook train-mode output
    (batch statistics over N, H, W), gradients and running statistics (momentum 0.9, biased
    variance), and eval output (running statistics)."""
    from halluvit_jax.layers import BatchNorm

    x = 3.0 * jax.random.normal(jax.random.key(0), (4, 5, 6, 8)) + 1.0  # NHWC maps
    ours = BatchNorm(momentum=0.9, epsilon=1e-5, impl=impl)
    v = ours.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, v) == {"params": {"scale": (8,), "bias": (8,)},
                                          "batch_stats": {"mean": (8,), "var": (8,)}}
    v = {"params": jax.tree.map(lambda t: t + 0.3 * jax.random.normal(jax.random.key(2), t.shape),
                                v["params"]),
         "batch_stats": jax.tree.map(lambda t: t + 0.5, v["batch_stats"])}
    w = jax.random.normal(jax.random.key(3), x.shape)

    def f(params, x):
        out, upd = ours.apply({**v, "params": params}, x, use_running_average=False,
                              mutable=["batch_stats"])
        return jnp.sum(out * w), (out, upd["batch_stats"])

    (_, (out, stats)), (grads, dx) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(v["params"], x)
    p, old = v["params"], v["batch_stats"]
    want, mean, var = ref.batch_norm_train(x, p["scale"], p["bias"], 1e-5)
    ref.assert_close(out, want, RTOL, "train output")
    ref.assert_close(stats["mean"], ref.running_average(old["mean"], mean, 0.9), RTOL, "mean")
    ref.assert_close(stats["var"], ref.running_average(old["var"], var, 0.9), RTOL, "var")
    _check_grads((dx, grads["scale"], grads["bias"]),
                 lambda x, s, b: ref.batch_norm_train(x, s, b, 1e-5)[0], (x, p["scale"], p["bias"]), w,
                 ("x", "scale", "bias"))
    ref.assert_close(ours.apply(v, x, use_running_average=True),
                     ref.batch_norm(x, p["scale"], p["bias"], old["mean"], old["var"], 1e-5), RTOL, "eval")


def test_batch_norm_train_keeps_one_tensor_fewer_per_layer():
    """`fused.batch_norm_train` against autodiff of the textbook train-mode BatchNorm: a stack of
    x + relu(BN(x)) layers, per layer, keeps at least one map-sized tensor fewer."""
    from halluvit_jax.layers.fused import batch_norm_train

    xs = jax.ShapeDtypeStruct((4, 64, 64, 16), jnp.float32)
    p = (jnp.ones(16), jnp.zeros(16))

    def flax_bn(x, s, b):
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
        return jax.nn.relu((x - mean) * jax.lax.rsqrt(var + 1e-5) * s + b)

    lean = lambda x, s, b: jax.nn.relu(batch_norm_train(x, s, b, 1e-5)[0])  # noqa: E731
    per_layer = {name: (_stack_temp_bytes(f, p, xs, 6) - _stack_temp_bytes(f, p, xs, 2)) / 4
                 for name, f in (("autodiff", flax_bn), ("lean", lean))}
    assert per_layer["autodiff"] - per_layer["lean"] >= 0.9 * 4 * 64 * 64 * 16 * 4, per_layer
