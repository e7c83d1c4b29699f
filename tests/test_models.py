"""Every registered model: shapes, gradients, train/eval behaviour, cFFN fold, parameter counts.

Parametrized over `list_models()`, so a newly registered variant is tested for free. Structure
tests build each model reduced (fewer blocks, narrower, small images) through `overrides`;
the parameter-count test uses the full-size definitions via `jax.eval_shape` (no compute).
Compiled functions take the (hashable) module as a static argument, so models that become
identical once reduced share one compilation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from halluvit_jax import reparameterize
from halluvit_jax.models import create_model, list_models

NUM_CLASSES = 10

# family prefix -> (overrides for a small model, input height/width). The overrides fix the
# widths, so variants of a family that differ only in size reduce to the same module and are
# tested together (one compilation; compiling is what costs time here).
# PVTv2 depths (1, 0, 0, 1): one block with spatial reduction (stage 0), one without (stage 3);
# stages 1-2 keep their downsample and norm.
SMALL: dict[str, tuple[dict, tuple[int, int]]] = {
    "deit": (dict(img_size=32, embed_dim=96, depth=2, num_heads=2), (32, 32)),
    "pvt_v2": (
        dict(depths=(1, 0, 0, 1), embed_dims=(16, 32, 40, 64), mlp_ratios=(8.0, 8.0, 4.0, 4.0)),
        (64, 64),
    ),
    "nextvit": (dict(depths=(1, 1, 5, 1)), (64, 64)),
}


def _family(name: str) -> str:
    for prefix in SMALL:
        if name.startswith(prefix):
            return prefix
    raise AssertionError(f"add reduced overrides for {name!r} to SMALL in tests/test_models.py")


def small_model(name: str, **extra):
    overrides, hw = SMALL[_family(name)]
    kwargs = dict(overrides, num_classes=NUM_CLASSES, drop_path_rate=0.5)
    kwargs.update(extra)
    return create_model(name, **kwargs), hw


def _images(hw, seed=0, batch=2, mean=0.0):
    return jnp.asarray(np.random.default_rng(seed).normal(mean, 1.0, (batch, *hw, 3)), jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _init(model, x):
    return model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)


@functools.partial(jax.jit, static_argnums=0)
def _eval_outputs(model, variables, x, w):
    """Eval-mode logits, d(sum(logits * w))/d(params), forward_features, pre-logits."""

    def loss(params):
        logits = model.apply({**variables, "params": params}, x)
        return jnp.sum(logits * w), logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    feats = model.apply(variables, x, method="forward_features")
    pre = model.apply(variables, x, pre_logits=True)
    return logits, grads, feats, pre


@functools.partial(jax.jit, static_argnums=0)
def _train_apply(model, variables, x, rng):
    return model.apply(variables, x, train=True, rngs={"dropout": rng}, mutable=["batch_stats"])


@functools.partial(jax.jit, static_argnums=0)
def _eval_apply(model, variables, x, rng):
    return model.apply(variables, x, rngs={"dropout": rng})


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = np.asarray(v)
    return out


ALL = list_models()
HAL = list_models("*_hal")


def _groups(names: list[str]) -> list[str]:
    """Registered names grouped by their reduced module; a group is one test id 'a+b+c'."""
    groups: dict = {}
    for name in names:
        groups.setdefault(small_model(name)[0], []).append(name)
    return ["+".join(g) for g in groups.values()]


GROUPS = _groups(ALL)
HAL_GROUPS = _groups(HAL)
# NextViT's reduced models compile for ~20-40 s each on 2 cores: their shape, gradient,
# train/eval and fold tests run in the slow tier; the fast tier covers NextViT's forward,
# gradients, BatchNorm updates and fold through tests/test_impl_equivalence.py and
# tests/test_nextvit.py.
# PVTv2 and NextViT (~12-60 s of compiling each) in the slow tier.
SLOW_GROUPS = [g if g.startswith("deit") else pytest.param(g, marks=pytest.mark.slow) for g in GROUPS]
# Train/eval determinism and drop-path: DeiT in the fast tier, every family in the slow one.
DEIT_GROUPS = [g if g.startswith("deit") else pytest.param(g, marks=pytest.mark.slow) for g in GROUPS]
SLOW_GROUPS_HAL = [g if g.startswith("deit") else pytest.param(g, marks=pytest.mark.slow) for g in HAL_GROUPS]


def test_registry_has_every_family_and_hal_variant():
    for name in ["deit_tiny", "deit_small", "deit_base"] + [f"pvt_v2_b{i}" for i in range(6)]:
        assert name in ALL and f"{name}_hal" in HAL


@pytest.mark.parametrize("group", SLOW_GROUPS)
def test_forward_shapes_and_gradients(group):
    """Output shapes, and every parameter gets a finite, non-zero gradient.

    Exception (by design, docs/design.md section 2): a bias added uniformly to every key column is
    invisible to the softmax, so `chh_bias` always, and `ihh_bias` when there is no class
    token (PVTv2, NextViT), have exactly zero gradient; we assert that instead.
    """
    name = group.split("+")[0]
    model, hw = small_model(name)
    x = _images(hw)
    variables = _init(model, x)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(2, NUM_CLASSES)), jnp.float32)
    logits, grads, feats, pre = _eval_outputs(model, variables, x, w)

    assert logits.shape == (2, NUM_CLASSES) and np.isfinite(np.asarray(logits)).all()
    assert feats.shape[0] == 2 and feats.ndim in (3, 4) and np.isfinite(np.asarray(feats)).all()
    assert pre.shape == (2, feats.shape[-1])
    if name.startswith("deit"):
        assert feats.shape == (2, 1 + (hw[0] // 16) ** 2, SMALL["deit"][0]["embed_dim"])
        np.testing.assert_allclose(pre, feats[:, 0], rtol=1e-6, atol=1e-6)  # class token pooling
    else:
        assert feats.shape[1:3] == (hw[0] // 32, hw[1] // 32)
        np.testing.assert_allclose(pre, feats.mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)  # avg pool

    has_prefix = name.startswith("deit")
    zero_by_design = ("chh_bias",) if has_prefix else ("chh_bias", "ihh_bias")
    flat = _flat(grads)
    assert flat
    for path, g in flat.items():
        assert np.isfinite(g).all(), path
        if path.rsplit("/", 1)[-1] in zero_by_design:
            assert np.abs(g).max() < 1e-5, f"{path}: expected ~0 gradient, got {np.abs(g).max()}"
        else:
            assert np.abs(g).max() > 0, f"{path}: zero gradient"


@pytest.mark.parametrize("group", DEIT_GROUPS)
def test_train_and_eval_modes(group):
    """Eval is deterministic (independent of the dropout rng); train with drop_path is not."""
    name = group.split("+")[0]
    model, hw = small_model(name)
    x = _images(hw, seed=2)
    variables = _init(model, x)
    k1, k2 = jax.random.key(11), jax.random.key(12)
    e1, e2 = _eval_apply(model, variables, x, k1), _eval_apply(model, variables, x, k2)
    np.testing.assert_array_equal(e1, e2)
    t1, _ = _train_apply(model, variables, x, k1)
    t1b, _ = _train_apply(model, variables, x, k1)
    t2, _ = _train_apply(model, variables, x, k2)
    np.testing.assert_array_equal(t1, t1b)
    assert np.abs(np.asarray(t1) - np.asarray(t2)).max() > 1e-4, "drop_path had no effect"


@pytest.mark.parametrize("group", SLOW_GROUPS_HAL)
def test_hal_fold_matches_training_form(group):
    """deploy=True model on `reparameterize(v)` == training-form model in eval mode.

    BatchNorm statistics come from a few train steps on non-zero-mean images and BN affines
    are randomized, so the fold has real statistics to absorb.
    """
    name = group.split("+")[0]
    model, hw = small_model(name)
    variables = _init(model, _images(hw))
    rng = np.random.default_rng(3)
    flat = _flat(variables["params"])
    assert any("/bn/" in p for p in flat), "no cFFN BatchNorm found"

    def randomize(tree, path=""):
        if not hasattr(tree, "items"):
            return tree + 0.2 * rng.standard_normal(np.shape(tree)).astype(np.float32) if "/bn/" in path else tree
        return {k: randomize(v, f"{path}/{k}") for k, v in tree.items()}

    variables = {**variables, "params": randomize(variables["params"])}
    for step in range(3):
        _, updates = _train_apply(model, variables, _images(hw, seed=10 + step, mean=1.5), jax.random.key(step))
        variables = {**variables, **updates}

    x = _images(hw, seed=20, mean=1.0)
    ref = np.asarray(_eval_apply(model, variables, x, jax.random.key(0)))
    deploy_model, _ = small_model(name, deploy=True)
    folded = reparameterize(variables)
    expected = jax.tree.map(lambda a: tuple(a.shape), jax.eval_shape(lambda: _init(deploy_model, x)))
    assert jax.tree.map(lambda a: tuple(np.shape(a)), folded) == expected
    out = np.asarray(_eval_apply(deploy_model, folded, x, jax.random.key(0)))
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert rel < 1e-5, f"fold relative error {rel:.3g}"


# Published / timm parameter counts of the full-size baselines (classifier head included;
# NextViT with its BatchNorm affine parameters, before timm's pre-BN fusion).
# deit_tiny/small, pvt_v2_b0/b1/b2, nextvit_small/base: timm's published param_count (see
# /work/shared/reference/timm_models.md). deit_base, pvt_v2_b3/b4/b5, nextvit_large: counted with
# timm 1.0.31, sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters()).
PARAM_COUNTS = {
    "deit_tiny": 5_717_416,
    "deit_small": 22_050_664,
    "deit_base": 86_567_656,
    "pvt_v2_b0": 3_666_760,
    "pvt_v2_b1": 14_009_000,
    "pvt_v2_b2": 25_362_856,
    "pvt_v2_b3": 45_238_696,
    "pvt_v2_b4": 62_556_072,
    "pvt_v2_b5": 81_956_008,
    "nextvit_small": 31_763_368,
    "nextvit_base": 44_818_856,
    "nextvit_large": 57_874_344,
}


LARGEST = {"deit_base", "pvt_v2_b3", "pvt_v2_b4", "pvt_v2_b5", "nextvit_base", "nextvit_large"}


def _param_count(name: str, **overrides) -> int:
    model = create_model(name, **overrides)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(shapes["params"]))


# The largest models (3-7 s of tracing each) in the slow tier.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGEST else n
                                  for n in sorted(PARAM_COUNTS)])
def test_full_size_parameter_count_matches_timm(name):
    if name not in ALL:
        pytest.skip(f"{name} is not registered yet")
    assert _param_count(name) == PARAM_COUNTS[name]


def test_pvt_v2_b1_hal_saves_the_params_design_predicts():
    """docs/design.md section 3: hMHSA + cFFN (deploy form) removes 13.21% of PVTv2-b1's parameters."""
    saving = 1 - _param_count("pvt_v2_b1_hal", deploy=True) / PARAM_COUNTS["pvt_v2_b1"]
    assert round(100 * saving, 2) == 13.21


def test_unknown_model_name_lists_close_matches():
    with pytest.raises(ValueError, match="Unknown model 'deit_smal'.*deit_small"):
        create_model("deit_smal")


def test_deit_rejects_wrong_input_size_with_hint():
    model = create_model("deit_tiny", depth=1)
    with pytest.raises(ValueError, match="img_size=224 .*got \\(1, 64, 64, 3\\).*img_size=64"):
        model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def test_hal_odd_head_count_is_a_configuration_error():
    # Refused when the model is built (create_model checks every attention layer's heads) ...
    with pytest.raises(ValueError, match="even head count"):
        create_model("deit_tiny_hal", num_heads=3, img_size=32, depth=1)
    # ... and by the layer itself for a model built directly.
    model = create_model("deit_tiny_hal", img_size=32, depth=1).clone(num_heads=3)
    with pytest.raises(ValueError, match="even head count"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_hal_variants_use_design_head_counts():
    """docs/design.md section 2: DeiT-T 3 -> 4 heads of 48; PVTv2 (1, 2, 5, 8) -> (2, 2, 4, 8)."""
    assert create_model("deit_tiny_hal").num_heads == 4
    assert create_model("deit_small_hal").num_heads == 6
    assert tuple(create_model("pvt_v2_b2_hal").num_heads) == (2, 2, 4, 8)
    assert tuple(create_model("pvt_v2_b2").num_heads) == (1, 2, 5, 8)
