"""`remat`: the same values and gradients, fewer saved residuals, on every family."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

import halluvit_jax as hv

TINY = {
    "deit_tiny_hal": (dict(depth=2, img_size=32, patch_size=8), 32),
    "pvt_v2_b0_hal": (dict(depths=(1, 1, 1, 1)), 64),
    "nextvit_small_hal": (dict(depths=(1, 1, 5, 1), conv_widths=(32, 32, 64, 64), head_dim=16,
                               transformer_widths=(128, 128, 128), stem_chs=(16, 16, 16)), 64),
}


def _loss_and_residuals(name, remat):
    kw, size = TINY[name]
    model = hv.create_model(name, num_classes=10, remat=remat, impl="plain", drop_path_rate=0.1, **kw)
    x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
    variables = model.init(jax.random.key(0), x)

    def loss(params):
        y, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.key(2)})
        return jnp.sum(y**2)

    kept = sum(a.size for a, why in saved_residuals(loss, variables["params"])
               if "argument" not in why)
    return jax.jit(jax.value_and_grad(loss))(variables["params"]), kept


@pytest.mark.slow  # ~30 s of compiling per model: remat and no-remat, forward and backward
@pytest.mark.parametrize("name", [
    "deit_tiny_hal",
    pytest.param("pvt_v2_b0_hal", marks=pytest.mark.slow),
    pytest.param("nextvit_small_hal", marks=pytest.mark.slow)])
def test_remat_block_keeps_values_and_gradients_and_saves_less(name):
    (l0, g0), kept0 = _loss_and_residuals(name, "none")
    for remat in ("block", "dots_with_no_batch_dims_saveable"):
        (l1, g1), kept1 = _loss_and_residuals(name, remat)
        np.testing.assert_allclose(l1, l0, rtol=1e-5)
        # Recomputation may reorder float sums: agreement to rounding of each gradient's scale.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(
            a, b, rtol=2e-3, atol=1e-4 * float(np.max(np.abs(b))) + 1e-7), g1, g0)
        assert kept1 < 0.8 * kept0, (remat, kept1, kept0)


def test_unknown_remat_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown remat 'blocks'"):
        hv.create_model("deit_tiny", remat="blocks", depth=1).init(
            jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
