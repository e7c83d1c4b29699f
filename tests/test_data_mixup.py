"""On-device Mixup/CutMix (timm batch-mode semantics) against hand formulas, on real photos.

Every call below goes through ``jax.jit`` (the train step jits it too)."""

from __future__ import annotations

import functools

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from halluvit_jax.data.mixup import mixup_cutmix, mixup_cutmix_params, smooth_one_hot

K = 10


@pytest.fixture(scope="module")
def batch():
    import skimage.data as d

    photos = [d.astronaut(), d.coffee(), d.chelsea(), d.rocket(), d.immunohistochemistry(),
              d.colorwheel()]
    imgs = np.stack([cv2.resize(p, (48, 40), interpolation=cv2.INTER_AREA) for p in photos])
    imgs = (imgs.astype(np.float32) / 255.0 - 0.45) / 0.25
    return jnp.asarray(imgs), jnp.asarray([3, 1, 4, 1, 5, 9], jnp.int32)


@functools.cache
def _fns(mixup_alpha, cutmix_alpha, prob=1.0, smoothing=0.1):
    """One jitted function returning ``((images, targets), params)`` for a config."""
    kw = {"mixup_alpha": mixup_alpha, "cutmix_alpha": cutmix_alpha, "switch_prob": 0.5,
          "prob": prob}

    @jax.jit
    def f(rng, x, y):
        out = mixup_cutmix(rng, x, y, num_classes=K, label_smoothing=smoothing, **kw)
        return out, mixup_cutmix_params(rng, x.shape, **kw)

    return f


def _hand_targets(labels, lam, smoothing):
    off = smoothing / K
    y = np.full((len(labels), K), off, np.float64)
    y[np.arange(len(labels)), np.asarray(labels)] = 1 - smoothing + off
    return lam * y + (1 - lam) * y[::-1]


def test_smooth_one_hot():
    y = np.asarray(smooth_one_hot(jnp.array([0, 7]), K, 0.1))
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(y[0, 0], 0.91, rtol=1e-6)
    np.testing.assert_allclose(y[0, 1], 0.01, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(smooth_one_hot(jnp.array([2]), K, 0.0))[0],
                                  np.eye(K)[2])


def test_mixup_matches_hand_formula(batch):
    x, y = batch
    for seed in range(5):
        rng = jax.random.PRNGKey(seed)
        (out, t), p = _fns(0.8, 0.0)(rng, x, y)
        lam = float(p["lam"])
        assert not bool(p["use_cutmix"]) and 0.0 <= lam <= 1.0
        xn = np.asarray(x)
        np.testing.assert_allclose(np.asarray(out), lam * xn + (1 - lam) * xn[::-1], atol=1e-5)
        np.testing.assert_allclose(np.asarray(t), _hand_targets(y, lam, 0.1), atol=1e-6)
        np.testing.assert_allclose(np.asarray(t).sum(-1), 1.0, atol=1e-6)


def test_cutmix_box_and_lambda_correction(batch):
    x, y = batch
    xn = np.asarray(x)
    H, W = xn.shape[1:3]
    for seed in range(8):
        rng = jax.random.PRNGKey(100 + seed)
        (out, t), p = _fns(0.0, 1.0)(rng, x, y)
        out = np.asarray(out)
        yl, yh, xl, xh = np.asarray(p["box"]).tolist()
        # pixels inside the box come from x[::-1], outside from x
        np.testing.assert_array_equal(out[:, yl:yh, xl:xh], xn[::-1][:, yl:yh, xl:xh])
        outside = np.ones((H, W), bool)
        outside[yl:yh, xl:xh] = False
        np.testing.assert_array_equal(out[:, outside], xn[:, outside])
        lam = float(p["lam"])
        assert lam == pytest.approx(1 - (yh - yl) * (xh - xl) / (H * W))  # corrected lambda
        np.testing.assert_allclose(np.asarray(t), _hand_targets(y, lam, 0.1), atol=1e-6)


def test_switch_prob_and_disabled_paths(batch):
    x, y = batch
    f = _fns(0.8, 1.0)
    frac_cut = np.mean([bool(f(jax.random.PRNGKey(s), x, y)[1]["use_cutmix"])
                        for s in range(200)])
    assert 0.37 < frac_cut < 0.63
    (out, t), _ = _fns(0.8, 1.0, prob=0.0)(jax.random.PRNGKey(0), x, y)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
    np.testing.assert_allclose(np.asarray(t), np.asarray(smooth_one_hot(y, K, 0.1)), atol=1e-7)
    (out, t), _ = _fns(0.0, 0.0, smoothing=0.0)(jax.random.PRNGKey(0), x, y)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(t), np.eye(K)[np.asarray(y)])
