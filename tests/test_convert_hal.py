"""Baseline -> hal initialization (halluvit_jax.convert.hal) and the `convert hal` CLI.

References are independent of the converter: numpy SVD error bounds (Eckart-Young), plain
numpy FFNs, the baseline `Attention` layer's own output, and the baseline model's logits.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import halluvit_jax as hv
from halluvit_jax.convert import ConversionError, save_variables
from halluvit_jax.convert.__main__ import main as cli_main
from halluvit_jax.convert.hal import (
    baseline_to_hal,
    bilinear_factors,
    cffn_from_mlp,
    conversion_report,
    convert_baseline_to_hal,
    hal_attention_from_attention,
    rep_dense_init,
    select_heads,
    truncated_svd_factors,
)
from halluvit_jax.layers import Attention, CompactMlp, HalAttention, Mlp
from halluvit_jax.layers.fused import gelu_exact
from halluvit_jax.reparam import reparameterize

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 4, "num_classes": 10}


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# SVD factorization.


def test_svd_factors_exact_at_full_rank():
    w = np.random.default_rng(0).normal(size=(40, 12))
    a, b = truncated_svd_factors(w, 12)
    assert a.shape == (40, 12) and b.shape == (12, 12)
    np.testing.assert_allclose(a @ b, w, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 5, 9])
def test_svd_factors_optimal_at_rank(rank):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(48, 16)) @ np.diag(np.linspace(3.0, 0.1, 16)) @ rng.normal(size=(16, 16))
    a, b = truncated_svd_factors(w, rank)
    err = np.linalg.norm(w - a @ b)
    s = np.linalg.svd(w, compute_uv=False)
    assert err == pytest.approx(np.sqrt(np.sum(s[rank:] ** 2)), rel=1e-9)  # Eckart-Young optimum
    # Any other rank-`rank` factorization is worse, e.g. a least-squares fit on random columns.
    basis = np.linalg.qr(rng.normal(size=(48, rank)))[0]
    assert err < np.linalg.norm(w - basis @ (basis.T @ w))


def test_cffn_from_mlp_matches_numpy_ffn():
    """Full rank: the CompactMlp equals the Mlp; rank c': equals numpy's best rank-c' FFN."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 7, 16)).astype(np.float32)
    mlp = Mlp(64)
    base = jax.device_get(jax.jit(mlp.init)(jax.random.key(0), x))["params"]
    base["fc1"]["bias"] = rng.normal(size=64).astype(np.float32) * 0.1
    base["fc2"]["bias"] = rng.normal(size=16).astype(np.float32) * 0.1
    hidden = gelu_exact(jnp.asarray(x @ base["fc1"]["kernel"] + base["fc1"]["bias"]))
    w2, b2 = np.asarray(base["fc2"]["kernel"], np.float64), np.asarray(base["fc2"]["bias"], np.float64)

    for ratio, width in ((1.25, 16), (2.0 / 3.0, 9)):
        cffn = CompactMlp(64, compact_ratio=ratio)
        shapes = jax.eval_shape(cffn.init, jax.random.key(1), x)["params"]
        assert shapes["fc2a"]["branch_kernel"].shape == (2, 64, width)
        params, stats = cffn_from_mlp(base, shapes, np.asarray(hidden).reshape(-1, 64))
        out = jax.jit(cffn.apply)({"params": params, "batch_stats": stats}, x)
        u, s, vt = np.linalg.svd(w2, full_matrices=False)
        best = (u[:, :width] * s[:width]) @ vt[:width]  # numpy's rank-c' approximation
        want = np.asarray(hidden, np.float64) @ best + b2
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
        if width == 16:
            np.testing.assert_allclose(out, jax.jit(mlp.apply)({"params": base}, x), rtol=1e-4, atol=1e-4)
        # The fold reproduces it too.
        folded = reparameterize({"params": params, "batch_stats": stats})
        out_deploy = jax.jit(CompactMlp(64, compact_ratio=ratio, deploy=True).apply)(folded, x)
        np.testing.assert_allclose(out_deploy, out, rtol=1e-5, atol=1e-5)


def test_rep_dense_init_exact_in_eval_and_on_calibration_batch_in_train():
    from halluvit_jax.layers.mlp import RepDense

    rng = np.random.default_rng(3)
    k, b = rng.normal(size=(10, 6)), rng.normal(size=6)
    x = (rng.normal(size=(64, 10)) * 2.0 + 1.0).astype(np.float32)
    params, stats = rep_dense_init(k, b, 3, x, rng=rng)
    assert not np.allclose(params["branch_kernel"][0], params["branch_kernel"][1])  # branches differ
    layer = RepDense(6, num_branches=3)
    want = x.astype(np.float64) @ k + b
    out = layer.apply({"params": params, "batch_stats": stats}, x)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    # Train mode normalizes by the batch statistics: on the calibration batch they are the same.
    out_train, _ = layer.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out_train, want, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------------
# Attention.


def test_select_heads_prefers_least_redundant():
    s = np.array([[1.0, 0.9, 0.2, 0.3], [0.9, 1.0, 0.25, 0.35], [0.2, 0.25, 1.0, 0.8], [0.3, 0.35, 0.8, 1.0]])
    kept = select_heads(s, 2)
    assert sorted(kept) in ([0, 2], [0, 3], [1, 2], [1, 3])  # one of each redundant pair
    assert kept[0] == 2  # lowest mean similarity to the others
    assert select_heads(s[:1, :1], 2) == [0, 0]


def test_bilinear_regroup_exact_when_rank_fits():
    rng = np.random.default_rng(4)
    q, k = rng.normal(size=(9, 3)), rng.normal(size=(9, 3))
    qp, kp = bilinear_factors(q, k, 5, scale=np.sqrt(5 / 3))
    np.testing.assert_allclose(qp @ kp.T / np.sqrt(5), q @ k.T / np.sqrt(3), atol=1e-12)


def test_hal_attention_reproduces_baseline_with_duplicated_heads():
    """Baseline heads 2, 3 attend exactly like heads 0, 1: the hal layer can and must be exact."""
    rng = np.random.default_rng(5)
    c, h, d, grid = 32, 4, 8, (3, 3)
    x = rng.normal(size=(4, 1 + 9, c)).astype(np.float32)
    base = Attention(c, h)
    p = jax.device_get(base.init(jax.random.key(0), x))["params"]
    w = np.asarray(p["qkv"]["kernel"]).reshape(c, 3, h, d).copy()
    bias = (rng.normal(size=(3, h, d)) * 0.1).astype(np.float32)
    w[:, :2, 2:] = w[:, :2, :2]  # q, k of heads 2, 3 = those of heads 0, 1
    bias[:2, 2:] = bias[:2, :2]
    w[:, :2] *= 8.0  # peaked maps
    p["qkv"] = {"kernel": w.reshape(c, 3 * c), "bias": bias.reshape(3 * c)}
    p["proj"]["bias"] = rng.normal(size=c).astype(np.float32) * 0.1
    want, state = base.apply({"params": p}, x, kv_grid=grid, num_prefix_tokens=1, mutable=["intermediates"])
    attn = np.asarray(state["intermediates"]["attn"][0])

    for variant in ("ihh_chh", "chh_ihh", "chh"):
        hal = HalAttention(c, h, variant=variant)
        shapes = jax.device_get(hal.init(jax.random.key(1), x, kv_grid=grid, num_prefix_tokens=1))["params"]
        params, plan = hal_attention_from_attention(p, shapes, attn, h)
        assert sorted(plan.slots) == [0, 1, 2, 3] and min(plan.chh_r2) > 0.999
        out = hal.apply({"params": params}, x, kv_grid=grid, num_prefix_tokens=1)
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Whole models.


def _agreement(base_name, base_vars, hal_name, hal_vars, images, bo, ho=None):
    return conversion_report(base_vars, base_name, hal_vars, hal_name, images,
                             baseline_overrides=bo, hal_overrides=ho)


@pytest.mark.slow  # ~9 s; the fast tier converts a trained baseline (test_converted_from_trained_baseline...)
def test_converted_deit_small_random_baseline_closer_than_random_hal():
    """DeiT-S width (384, 6 heads), reduced depth and resolution, randomly initialized baseline."""
    bo = {"img_size": 32, "patch_size": 8, "depth": 1, "num_classes": 10}
    images = _images(8)
    base = hv.create_model("deit_small", **bo).init(jax.random.key(7), images[:1])
    hal, plans = convert_baseline_to_hal(base, "deit_small", "deit_small_hal", images, baseline_overrides=bo)
    assert [len(p.kept) for p in plans] == [3]
    report = _agreement("deit_small", base, "deit_small_hal", hal, images, bo)
    conv, rand = report["converted"], report["random_init"]
    assert conv["cosine"] > 0.5 and conv["cosine"] > rand["cosine"] + 0.3
    assert conv["top1_agreement"] >= rand["top1_agreement"]


def test_regrouped_attention_three_heads_into_four_is_close():
    """DeiT-T style re-grouping (3 heads of 16 -> 4 of 12): closer than a fresh HalAttention."""
    rng = np.random.default_rng(6)
    c, grid = 48, (4, 4)
    x = rng.normal(size=(4, 1 + 16, c)).astype(np.float32)
    base = Attention(c, 3)
    p = jax.device_get(jax.jit(base.init)(jax.random.key(0), x))["params"]
    p["qkv"]["kernel"] = p["qkv"]["kernel"] * 10.0  # trained-like, peaked maps
    want, state = jax.jit(lambda p, x: base.apply({"params": p}, x, kv_grid=grid, num_prefix_tokens=1,
                                                  mutable=["intermediates"]))(p, x)
    hal = HalAttention(c, 4)
    fresh = jax.device_get(jax.jit(lambda x: hal.init(jax.random.key(1), x, kv_grid=grid, num_prefix_tokens=1))(x))
    params, plan = hal_attention_from_attention(p, fresh["params"], state["intermediates"]["attn"][0], 4)
    assert plan.baseline_heads == 3 and sorted(set(plan.slots)) == [0, 1, 2]
    apply = jax.jit(lambda p, x: hal.apply({"params": p}, x, kv_grid=grid, num_prefix_tokens=1))
    err = np.linalg.norm(apply(params, x) - want)
    err_fresh = np.linalg.norm(apply(fresh["params"], x) - want)
    assert err < 0.7 * err_fresh, (err, err_fresh)  # measured 0.57: one head is hallucinated, d 16 -> 12


DEMO = {"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0, "num_classes": 10}
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "demo_baseline.npz")


@pytest.fixture(scope="module")
def trained_demo_baseline():
    """The demo baseline trained 30 epochs on the digits (94.3% top-1), float16, + 96 val images.

    Made by tests/fixtures/make_demo_baseline.py from `configs/demo_baseline.py`.
    """
    from halluvit_jax.convert.state_dict import unflatten

    data = np.load(FIXTURE)
    variables = unflatten({k[4:]: data[k].astype(np.float32) for k in data.files if k.startswith("var/")})
    return variables, data["images"].astype(np.float32), data["labels"]


@pytest.mark.slow  # ~20 s: trains a baseline first
def test_converted_from_trained_baseline_beats_random_hal(trained_demo_baseline):
    base, images, labels = trained_demo_baseline
    calib, xte, yte = images[:16], images[32:], labels[32:]
    bm = hv.create_model("deit_tiny", **DEMO)
    acc_base = float(np.mean(np.asarray(jax.jit(bm.apply)(base, xte)).argmax(-1) == yte))
    assert acc_base > 0.85, acc_base  # the stored baseline is a trained one
    hal = baseline_to_hal(base, "deit_tiny", "deit_tiny_hal", calib, baseline_overrides=DEMO)
    hm = hv.create_model("deit_tiny_hal", **DEMO)
    acc_hal = float(np.mean(np.asarray(jax.jit(hm.apply)(hal, xte)).argmax(-1) == yte))
    report = _agreement("deit_tiny", base, "deit_tiny_hal", hal, xte, DEMO)
    conv, rand = report["converted"], report["random_init"]
    assert conv["cosine"] > rand["cosine"] + 0.3
    assert conv["top1_agreement"] > rand["top1_agreement"] + 0.2
    assert acc_hal > 0.3, acc_hal  # well above chance (10 classes) before any fine-tuning


def test_wrong_model_raises_conversion_error():
    images = _images(2)
    other = dict(TINY, embed_dim=64)
    shapes = jax.eval_shape(hv.create_model("deit_tiny", **other).init, jax.random.key(0), images[:1])
    base = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    with pytest.raises(ConversionError, match="does not match"):
        baseline_to_hal(base, "deit_tiny", "deit_tiny_hal", images, baseline_overrides=TINY)


# --------------------------------------------------------------------------------------------
# CLI.


@pytest.fixture(scope="module")
def converted_baseline_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hal_cli")
    bm = hv.create_model("deit_tiny", **TINY)
    variables = jax.device_get(bm.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3))))
    path = save_variables(root / "deit_tiny", variables, {"model": "deit_tiny", "overrides": TINY})
    return root, path


def test_cli_hal_writes_converted_checkpoint(converted_baseline_dir, capsys):
    root, src = converted_baseline_dir
    out = root / "hal"
    assert cli_main(["hal", "--from", src, "--model", "deit_tiny_hal", "--output", str(out),
                     "--calib-images", "4"]) == 0
    assert "cosine" in capsys.readouterr().out
    card = json.loads((out / "model_card.json").read_text())
    assert card["model"] == "deit_tiny_hal" and card["overrides"] == TINY
    assert card["report"]["converted"]["cosine"] > card["report"]["random_init"]["cosine"]
    from halluvit_jax.checkpoint import read_checkpoint

    variables = read_checkpoint(out).variables
    hm = hv.create_model("deit_tiny_hal", **TINY)
    hm.apply(variables, jnp.zeros((1, 32, 32, 3)))  # loads into the hal model
    assert "branch_kernel" in variables["params"]["blocks_0"]["mlp"]["fc2a"]


@pytest.mark.parametrize("case", ["wrong_model", "existing_output", "missing_checkpoint"])
def test_cli_hal_errors_one_line_nothing_written(converted_baseline_dir, case, capsys):
    root, src = converted_baseline_dir
    out = root / f"out_{case}"
    args = ["hal", "--from", src, "--model", "deit_tiny_hal", "--output", str(out), "--calib-images", "2"]
    if case == "wrong_model":
        args[4] = "pvt_v2_b1_hal"
    elif case == "existing_output":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    else:
        args[2] = str(root / "nope")
    assert cli_main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    if case == "existing_output":
        assert sorted(os.listdir(out)) == ["keep.txt"] and "--overwrite" in err
    else:
        assert not out.exists()
    if case == "wrong_model":
        assert "deit_tiny" in err and "pvt_v2_b1" in err
