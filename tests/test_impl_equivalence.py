"""``impl="fused"`` (the CPU kernels of `halluvit_jax.layers.fused`) equals ``impl="plain"`` (the
stock-op reference forward), and ``impl="auto"`` (which picks fused on this CPU) equals plain too:
values, gradients w.r.t. params and inputs, and the updated BatchNorm statistics in train mode,
for every layer and every registered model family (reduced sizes); plus `HalConfig` through
`create_model`.

The layers' plain paths are checked against independent float64 references in
tests/test_layers.py, tests/test_fused_layers.py and tests/test_conv_layers.py; here the paths
are checked against each other, in float32, on the same random variables (built from
`jax.eval_shape`, so no init is compiled). Each case runs its impls (and both modes where a
layer has BatchNorm) in ONE jitted function, so it compiles once: compiling is what costs time
here, so "auto" is checked once per layer class (each calls `halluvit_jax.layers.run`
itself) with gradients, and on every model family's train-mode forward pass and statistics.

Comparison: per leaf, ``max|got - want| <= rtol * max(max|want|, floor * scale)`` where
``scale`` is the largest magnitude over the whole tree: a relative tolerance with a floor for
leaves that are mathematically ~0 (``chh_bias``'s gradient: a bias uniform over the keys is
invisible to the softmax; ``ihh_bias``'s without prefix tokens).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from halluvit_jax import HalConfig, create_model, deploy_form
from halluvit_jax.layers import (
    HAL_VARIANTS,
    Attention,
    BatchNorm,
    CompactMlp,
    DepthwiseConv3x3,
    HalAttention,
    LayerNorm,
    Mlp,
    PreNorm,
    RepDense,
)
from halluvit_jax.models.nextvit import GroupedConv3x3

IMPLS = ("plain", "fused", "auto")
# float32: fused and plain differ by summation order only. Values and BatchNorm statistics
# to 1e-5 of their scale (measured: <= 2.2e-6), gradients to 1e-4 (measured: <= 6e-6), bias
# gradients to 5e-4 (measured: <= 1.5e-4): a bias's gradient is the cotangent summed over every
# token, whose terms largely cancel, so its rounding error is large relative to the sum.
RTOL = {"out": 1e-5, "stats": 1e-5, "grads": 1e-4}
RTOL_BIAS_GRADS = 5e-4
FLOOR = 1e-3  # relative to the largest entry of the tree being compared
# Every case compiles one program holding all impls; LLVM's optimization level changes how fast
# XLA compiles (~40% of the time here), not what the HLO computes.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _normal(seed, shape, scale=1.0, mean=0.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(mean + scale * rng.standard_normal(shape), jnp.float32)


def _fan_in(name, shape):
    if name.endswith("['branch_kernel']"):  # [r, in, out]
        return shape[1]
    if name.endswith("['ihh_kernel']"):  # [heads, 3, 3]
        return 9
    return math.prod(shape[:-1])  # Dense [in, out], conv HWIO, CHH [in, out]


def _random_variables(shapes, seed, scale=None):
    """Random variables of the structure ``shapes`` (nothing to compile; no identity init hides
    an indexing mistake): weights N(0, scale^2), or with ``scale=None`` N(0, 1 / fan_in) (deep
    models stay O(1)) and position embeddings / class token N(0, 0.02^2); biases N(0, 0.1^2);
    norm scales 1 + N(0, 0.1^2); running means N(0, 0.25), running variances 1 + |N(0, 0.25)|."""

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        noise = _normal(seed + zlib.crc32(name.encode()) % 100_000, s.shape)
        if name.endswith("['var']"):
            return 1.0 + 0.5 * jnp.abs(noise)
        if name.endswith("['mean']"):
            return 0.5 * noise
        if name.endswith("['scale']"):
            return 1.0 + 0.1 * noise
        if name.endswith("bias']"):
            return 0.1 * noise
        if scale is not None:
            return scale * noise
        if name.endswith(("['pos_embed']", "['cls_token']")):
            return 0.02 * noise
        return noise / math.sqrt(_fan_in(name, s.shape))

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _assert_tree_close(got, want, rtol, what):
    if want is None:
        assert got is None, what
        return
    assert jax.tree.structure(got) == jax.tree.structure(want), what
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(want)]
    got = [np.asarray(a, np.float64) for a in jax.tree.leaves(got)]
    want = [np.asarray(a, np.float64) for a in jax.tree.leaves(want)]
    scale = max(float(np.max(np.abs(w))) for w in want)
    assert scale > 0, what
    for path, g, w in zip(paths, got, want):
        assert g.shape == w.shape and np.all(np.isfinite(g)), f"{what}{path}"
        err = float(np.max(np.abs(g - w)))
        leaf_rtol = RTOL_BIAS_GRADS if "grads" in what and path.endswith("bias']") else rtol
        bound = leaf_rtol * max(float(np.max(np.abs(w))), FLOOR * scale)
        assert err <= bound, f"{what}{path}: max error {err:.3g} > {bound:.3g}"


def _run(make, call, variables, inputs, grad_modes=("train",), value_modes=(), impls=IMPLS,
         grad_impls=IMPLS):
    """For each impl and mode ("train" / "eval"): the output, the updated batch_stats (train
    mode) and, for ``grad_modes`` and ``grad_impls``, the gradients of a non-linear loss w.r.t.
    (params, inputs). One jit, so one compilation, for all of them. Then every impl is compared
    with plain (``impls[0]``)."""

    def all_impls(variables, inputs):
        results = {}
        for impl in impls:
            module = make(impl)
            for mode in (*grad_modes, *value_modes):
                def loss(params, inputs, module=module, mode=mode):
                    out, stats = call(module, {**variables, "params": params}, inputs,
                                      mode == "train")
                    w = jax.random.normal(jax.random.key(7), out.shape, out.dtype)
                    return jnp.sum(jnp.sin(out) * w), (out, stats)

                if mode in grad_modes and impl in grad_impls:
                    (_, (out, stats)), g = jax.value_and_grad(loss, (0, 1), has_aux=True)(
                        variables["params"], inputs)
                else:
                    (_, (out, stats)), g = loss(variables["params"], inputs), None
                results[impl, mode] = {"out": out, "grads": g, "stats": stats}
        return results

    results = jax.jit(all_impls, compiler_options=COMPILER_OPTIONS)(variables, inputs)
    for mode in (*grad_modes, *value_modes):
        want = results["plain", mode]
        for impl in impls[1:]:
            for key, rtol in RTOL.items():
                if key == "grads" and mode in grad_modes and impl not in grad_impls:
                    continue
                _assert_tree_close(results[impl, mode][key], want[key], rtol,
                                   f"{impl} vs plain, {mode}, {key}")
    return results


# --------------------------------------------------------------------------------------------
# Layers.


def _call(**kwargs):
    """``module.apply(v, *inputs, train=..., **kwargs)`` with the updated batch statistics in
    train mode when the module has BatchNorms. ``kwargs``: static call arguments (grids)."""

    def call(module, variables, inputs, train):
        if "batch_stats" in variables:
            out, upd = module.apply(variables, *inputs, train=train, mutable=["batch_stats"],
                                    **kwargs)
            return out, upd["batch_stats"] if train else None
        return module.apply(variables, *inputs, train=train, **kwargs), None

    return call


def _prenorm(x, seed):
    """The block's deferred LayerNorm as the layer's input (`LayerNorm(defer=True)`): the
    fused path folds it into the first matmul; gradients flow to the tokens and the norm."""
    c = x.shape[-1]
    return PreNorm(x, 1.0 + 0.3 * _normal(seed, (c,)), 0.2 * _normal(seed + 1, (c,)), 1e-6)


def _tokens(x):
    return x.x if isinstance(x, PreNorm) else x


def _layer_case(make, inputs, call, init_kwargs=None, grad_modes=("train",), value_modes=(),
                auto=False, seed=100, extra=()):
    """Random variables of ``make("plain")``'s structure (no init to compile), then plain and
    fused, ``extra`` impls (a layer's "accel" form), and with ``auto`` the default impl too, on
    them. Every layer class calls `halluvit_jax.layers.run` itself, so one case per class
    checks "auto" (compiling is what costs time here)."""
    shapes = jax.eval_shape(lambda: make("plain").init(
        jax.random.key(0), *(_tokens(x) for x in inputs), **(init_kwargs or {})))
    impls = (*IMPLS[:2], *extra, *IMPLS[2:3] * bool(auto))
    return _run(make, call, _random_variables(shapes, seed, scale=0.3), inputs, grad_modes,
                value_modes, impls, impls)


X_CLS = _normal(1, (2, 1 + 12, 32))  # class token + a 3x4 grid
X_GRID = _normal(2, (2, 20, 32))  # a 4x5 grid
X_GRID12 = _normal(3, (2, 12, 32))  # a 3x4 grid
KV = _normal(4, (2, 6, 32))  # reduced keys on a 2x3 grid
KV_CLS = _normal(5, (2, 1 + 6, 32))  # a prefix key + a 2x3 grid

# id: (queries, keys (None: the queries), key grid, prefix tokens). "prefix" is DeiT's layout
# (its block feeds the deferred norm), "kv" PVTv2's / NextViT's reduced keys, "self_prenorm"
# PVTv2's last stage, "kv_prefix" both at once.
ATTENTION_CASES = {
    "prefix": (_prenorm(X_CLS, 10), None, (3, 4), 1),
    "kv": (X_GRID, KV, (2, 3), 0),
    "self_prenorm": (_prenorm(X_GRID12, 12), None, (3, 4), 0),
    "kv_prefix": (X_CLS, KV_CLS, (2, 3), 1),
}


@pytest.mark.parametrize("case", ["prefix", "kv", "self_prenorm"])
def test_attention(case):
    x, kv, grid, prefix = ATTENTION_CASES[case]
    make = lambda impl: Attention(32, 4, impl=impl)  # noqa: E731
    _layer_case(make, (x,) if kv is None else (x, kv), _call(), auto=case == "kv")


# The fast tier keeps every variant in DeiT's layout and the default variant with reduced keys;
# the other layouts of each variant run in the slow tier.
HAL_CASES = [pytest.param(variant, case, id=f"{variant}-{case}",
                          marks=[] if case == "prefix" or (variant, case) == ("ihh_chh", "kv") else [pytest.mark.slow])
             for variant, case in [(variant, case) for variant in HAL_VARIANTS for case in ("prefix", "kv")] + [
                 ("ihh_chh", "self_prenorm"), ("ihh_chh", "kv_prefix"), ("chh_ihh", "kv_prefix")]]


@pytest.mark.parametrize("variant,case", HAL_CASES)
def test_hal_attention(variant, case):
    x, kv, grid, prefix = ATTENTION_CASES[case]
    make = lambda impl: HalAttention(32, 4, variant=variant, hal_init="random", impl=impl)  # noqa: E731
    kw = dict(kv_grid=grid, num_prefix_tokens=prefix)
    results = _layer_case(make, (x,) if kv is None else (x, kv), _call(**kw), kw,
                          auto=(variant, case) == ("ihh_chh", "prefix"))
    param_grads = results["plain", "train"]["grads"][0]
    assert {"ihh_kernel", "chh_kernel"} & set(param_grads) or variant == "copy"


@pytest.mark.parametrize("dwconv,prenorm", [(False, False), (False, True), (True, True)],
                         ids=["tokens", "prenorm", "dwconv_prenorm"])
def test_mlp(dwconv, prenorm):
    """NextViT's (tokens or maps), DeiT's (deferred norm) and PVTv2's (deferred norm, dwconv)."""
    x = 2.0 * X_GRID12[..., :16]
    make = lambda impl: Mlp(48, use_dwconv=dwconv, impl=impl)  # noqa: E731
    kw = {"grid": (3, 4)} if dwconv else {}
    _layer_case(make, (_prenorm(x, 20) if prenorm else x,), _call(**kw), kw, auto=dwconv)


# (factorize, dwconv, input, act, branches): DeiT-hal's and PVTv2-hal's cFFNs take the deferred
# norm (GELU), NextViT's NHWC maps (ReLU).
CFFN_CASES = {
    "w2": ("w2", False, "prenorm", "gelu", 2),
    "w2_dwconv": ("w2", True, "prenorm", "gelu", 2),
    "w2_maps": ("w2", False, "maps", "relu", 2),
    "w2_three_branches": ("w2", False, "tokens", "gelu_tanh", 3),
    "w1_maps": ("w1", False, "maps", "gelu", 2),
    "w1_dwconv": ("w1", True, "tokens", "gelu", 2),
}


@pytest.mark.parametrize("case", sorted(CFFN_CASES))
def test_compact_mlp(case, monkeypatch):
    """cFFN in training form: train mode (batch statistics; running averages) with gradients,
    eval mode (running averages) values; "pallas" runs the Mosaic kernels of
    `halluvit_jax.layers.kernels.cffn_pallas` in Pallas' interpreter for ``w2`` in train mode
    (on maps the lanes kernels, their batch and row minimums lowered to this batch of 2)."""
    factorize, dwconv, kind, act, branches = CFFN_CASES[case]
    x = 2.0 * X_GRID12[..., :16] + 0.5
    x = {"prenorm": _prenorm(x, 21), "maps": x.reshape(2, 3, 4, 16), "tokens": x}[kind]
    if case == "w2_maps":
        from halluvit_jax.layers.kernels import cffn_pallas
        monkeypatch.setattr(cffn_pallas, "LANES", 2)
        monkeypatch.setattr(cffn_pallas, "MIN_ROWS_PER_HIDDEN", 0)
        v = jax.eval_shape(lambda: CompactMlp(48, act=act, num_branches=branches).init(
            jax.random.key(0), x, train=True))["params"]
        assert importlib.import_module("halluvit_jax.layers.mlp")._pallas_applies(v, x, None, factorize="w2", train=True)
    make = lambda impl: CompactMlp(48, factorize=factorize, use_dwconv=dwconv, act=act,  # noqa: E731
                                   num_branches=branches, impl=impl)
    kw = {"grid": (3, 4)} if dwconv else {}
    results = _layer_case(make, (x,), _call(**kw), kw, value_modes=("eval",),
                          auto=case == "w2_dwconv", extra=("accel", "pallas"))
    assert results["plain", "train"]["stats"]  # the running averages were updated


@pytest.mark.parametrize("factorize", ["w2", "w1"])
def test_compact_mlp_deploy_form(factorize):
    x = _prenorm(2.0 * X_GRID12[..., :16], 22)
    make = lambda impl: CompactMlp(48, factorize=factorize, deploy=True, use_dwconv=True,  # noqa: E731
                                   impl=impl)
    _layer_case(make, (x,), _call(grid=(3, 4)), {"grid": (3, 4)})


# (features, branches): the accel form takes its statistics from the input's Gram matrix where
# in <= (r - 1) * out (5 -> 6 with 3 branches), from the branches otherwise (5 -> 2, and any
# single branch).
@pytest.mark.parametrize("deploy,features,branches", [(False, 6, 3), (False, 2, 2), (False, 6, 1),
                                                      (True, 6, 3)],
                         ids=["training_form_gram", "training_form_branches", "one_branch",
                              "deploy_form"])
def test_rep_dense(deploy, features, branches):
    x = _normal(23, (4, 7, 5), 2.0, 0.5)
    make = lambda impl: RepDense(features, num_branches=branches, deploy=deploy, impl=impl)  # noqa: E731
    _layer_case(make, (x,), _call(), grad_modes=("eval",) if deploy else ("train", "eval"),
                auto=not deploy and branches == 3, extra=("accel",))


def test_rep_dense_accel_never_builds_the_branch_outputs_of_a_narrow_factor():
    """What the accel form is for: with the statistics from the input's Gram matrix, neither
    the forward nor the backward of a narrow factor holds the ``[..., r, out]`` branch outputs
    (the plain path does: they are what its BatchNorms normalize)."""
    x = _normal(26, (4, 7, 5), 2.0, 0.5)

    def program(impl):
        module = RepDense(6, num_branches=3, impl=impl)
        variables = module.init(jax.random.key(0), x)

        def loss(params, x):
            out, _ = module.apply({**variables, "params": params}, x, train=True,
                                  mutable=["batch_stats"])
            return jnp.sum(jnp.sin(out))

        return str(jax.make_jaxpr(jax.grad(loss, (0, 1)))(variables["params"], x))

    branches = "[4,7,3,6]"
    assert branches in program("plain")
    assert branches not in program("accel")


def _call_plain(module, variables, inputs, train):
    return module.apply(variables, *inputs), None


def test_layer_norm():
    x = _normal(24, (2, 5, 16), 3.0, 1.0)
    _layer_case(lambda impl: LayerNorm(impl=impl), (x,), _call_plain, auto=True)


def test_batch_norm():
    x = _normal(25, (4, 5, 6, 8), 3.0, 1.0)  # NHWC maps

    def call(module, variables, inputs, train):
        out, upd = module.apply(variables, *inputs, use_running_average=not train,
                                mutable=["batch_stats"])
        return out, upd["batch_stats"] if train else None

    _layer_case(lambda impl: BatchNorm(momentum=0.9, impl=impl), (x,), call,
                grad_modes=("train", "eval"), auto=True)


def test_grouped_conv3x3():
    x = _normal(26, (2, 5, 6, 16))
    _layer_case(lambda impl: GroupedConv3x3(2, impl=impl), (x,), _call_plain, auto=True)


@pytest.mark.parametrize("layout", ["maps", "tokens"])
def test_depthwise_conv3x3(layout):
    maps = _normal(27, (2, 5, 7, 6))
    x, grid = (maps, None) if layout == "maps" else (maps.reshape(2, 35, 6), (5, 7))

    def call(module, variables, inputs, train):
        return module.apply(variables, *inputs, grid), None

    _layer_case(lambda impl: DepthwiseConv3x3(impl=impl), (x,), call, {"grid": grid},
                auto=layout == "maps")


# --------------------------------------------------------------------------------------------
# Models (reduced sizes): train mode with gradients (params and images) and BatchNorm
# statistics.

REDUCED = {
    # PVTv2: one block with spatial-reduction attention (stage 0), one without (stage 3);
    # stages 1-2 keep their downsampling and norm.
    "deit": (dict(depth=2, img_size=32, patch_size=8), 32),
    "pvt_v2": (dict(depths=(1, 0, 0, 1)), 64),
    "nextvit": (dict(depths=(1, 1, 5, 1), conv_widths=(32, 32, 64, 64),
                     transformer_widths=(128, 128, 128), stem_chs=(16, 16, 16), head_dim=16,
                     drop_path_rate=0.0), 64),
}
FAMILY_NAMES = {"deit": "deit_tiny", "pvt_v2": "pvt_v2_b0", "nextvit": "nextvit_small"}


def _reduced(family, name, **kwargs):
    overrides, size = REDUCED[family]
    make = lambda impl: create_model(name, impl=impl, num_classes=10, **overrides,  # noqa: E731
                                     **kwargs)
    return make, _normal(30, (2, size, size, 3))


def _call_model(module, variables, inputs, train):
    if "batch_stats" in variables:
        out, upd = module.apply(variables, *inputs, train=train, mutable=["batch_stats"])
        return out, upd["batch_stats"] if train else None
    return module.apply(variables, *inputs, train=train), None


def _leaf_names(tree):
    return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}


# PVTv2 and NextViT (~10-60 s of compiling each on 2 cores) run in the slow tier: their blocks
# are made of the attention and MLP layers whose paths the layer tests above compare.
FAMILY_CASES = [pytest.param(family, hal, id=f"{family}-{'hal' if hal else 'baseline'}",
                             marks=[pytest.mark.slow] if family != "deit" else [])
                for family in sorted(REDUCED) for hal in (False, True)]


@pytest.mark.parametrize("family,hal", FAMILY_CASES)
def test_model_family(family, hal):
    make, x = _reduced(family, FAMILY_NAMES[family] + ("_hal" if hal else ""))
    # Random variables: IHH/CHH are no identities (the hallucinated heads no copies).
    variables = _random_variables(jax.eval_shape(make("plain").init, jax.random.key(0), x), 300)
    # Train mode: gradients on the plain and fused paths, "auto" (fused on this CPU) on the
    # forward pass with the BatchNorm statistics; its gradients are checked layer by layer
    # above, as are eval mode's running-average paths (BatchNorm, RepDense, CompactMlp).
    # Compiling is what costs time here.
    results = _run(make, _call_model, variables, (x,), ("train",), grad_impls=IMPLS[:2])
    assert results["plain", "train"]["out"].shape == (2, 10)
    names = _leaf_names(variables)
    assert any("ihh_kernel" in n for n in names) == hal
    assert any("fc2a" in n for n in names) == hal
    assert (results["plain", "train"]["stats"] is not None) == ("batch_stats" in variables)


# --------------------------------------------------------------------------------------------
# HalConfig through create_model.


def _param_shapes(model, size=224):
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    return jax.tree.map(lambda a: a.shape, shapes)


def test_baseline_name_with_hal_config_is_the_hal_preset():
    assert create_model("deit_small", hal=HalConfig()) == create_model("deit_small_hal")
    assert _param_shapes(create_model("deit_small", hal=HalConfig())) == \
        _param_shapes(create_model("deit_small_hal"))


def test_baseline_name_with_odd_heads_and_hal_config_is_a_clear_error():
    with pytest.raises(ValueError, match=r"even head counts.*\[3, 3.*deit_tiny_hal"):
        create_model("deit_tiny", hal=HalConfig())


@pytest.mark.parametrize("family", [f if f == "deit" else pytest.param(f, marks=pytest.mark.slow)
                                    for f in sorted(REDUCED)])
@pytest.mark.parametrize("hal", [HalConfig(cffn=False), HalConfig(variant="chh")],
                         ids=["no_cffn", "chh"])
def test_hal_config_variants_build_and_run(family, hal):
    """hMHSA without cFFN (Table 5's ablation) and the CHH-only variant build on every family
    (the params say so) and run (default impl, train mode: the batch statistics too)."""
    make, x = _reduced(family, FAMILY_NAMES[family] + "_hal", hal=hal)
    model = make("auto")
    assert model.hal == hal
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    names = _leaf_names(shapes)
    assert any("chh_kernel" in n for n in names)
    assert any("ihh_kernel" in n for n in names) == (hal.variant != "chh")
    assert any("fc2a" in n for n in names) == hal.cffn
    has_bn = family == "nextvit" or hal.cffn  # NextViT's own BatchNorms, the cFFN branches'
    assert ("batch_stats" in shapes) == has_bn
    run = jax.jit(lambda v, x: _call_model(model, v, (x,), True), compiler_options=COMPILER_OPTIONS)
    out, stats = run(_random_variables(shapes, 400), x)
    assert out.shape == (2, 10) and np.all(np.isfinite(out))
    assert (stats is not None) == has_bn


def test_legacy_flat_keys_map_onto_hal_config():
    model = create_model("deit_small_hal", hal_variant="chh", cffn=False)
    assert model.hal == HalConfig(variant="chh", cffn=False)
    deploy = create_model("pvt_v2_b0_hal", deploy=True, compact_ratio=0.5, num_branches=3)
    assert deploy.hal == HalConfig(deploy=True, compact_ratio=0.5, num_branches=3)
    assert deploy == deploy_form(create_model("pvt_v2_b0_hal", compact_ratio=0.5, num_branches=3))
    assert create_model("nextvit_small_hal", hal_variant="ihh", factorize="w1").hal == \
        dataclasses.replace(HalConfig(), variant="ihh", factorize="w1")
    # deploy=True on a baseline is the baseline; other hal keys on a baseline are refused.
    assert create_model("deit_small", deploy=True) == create_model("deit_small")
    assert deploy_form(create_model("deit_small")) == create_model("deit_small")
    with pytest.raises(ValueError, match="variant"):
        create_model("deit_small", hal_variant="chh")
