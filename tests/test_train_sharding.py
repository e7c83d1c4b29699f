"""Sharded training (8 virtual devices, mesh data=2 x fsdp=2 x model=2) equals 1-device training."""

from __future__ import annotations

import data_fixtures as dfx
import jax
import numpy as np
import pytest
from test_train_common import read_metrics, tiny_demo_config, train_losses

from halluvit_jax.train import train_and_evaluate


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return dfx.prepared_demo(tmp_path_factory)


def test_sharded_2x2x2_matches_one_device(demo_dir, tmp_path):
    assert jax.device_count() == 8
    kw = dict(total_steps=4, checkpoint_every_steps=None, eval_every_steps=4, fsdp_min_size=256)
    kw["model.drop_path_rate"] = 0.1  # dropout RNG must not depend on the sharding either
    one = tiny_demo_config(demo_dir, **kw, **{"mesh.num_devices": 1})
    eight = tiny_demo_config(demo_dir, **kw, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.model": 2})
    s1 = train_and_evaluate(one, str(tmp_path / "one"))
    s8 = train_and_evaluate(eight, str(tmp_path / "eight"))

    # The 8-device state really is sharded: the qkv kernel is split over 'fsdp' and 'model'.
    qkv = s8.params["blocks_0"]["attn"]["qkv"]["kernel"]
    assert qkv.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
    assert len({str(s.index) for s in qkv.addressable_shards}) == 4

    l1, l8 = train_losses(str(tmp_path / "one")), train_losses(str(tmp_path / "eight"))
    assert sorted(l1) == [1, 2, 3, 4] and sorted(l8) == [1, 2, 3, 4]
    for step in l1:
        assert l8[step] == pytest.approx(l1[step], rel=1e-5, abs=1e-6), step
    # Losses move (the test would not notice a frozen model otherwise).
    assert l1[4] != l1[1]
    p1, p8 = jax.device_get(s1.params), jax.device_get(s8.params)
    # Adam turns rounding-sized differences of near-zero gradients into lr-sized steps: the
    # parameters agree to ~lr; the losses above are the tight check.
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-3), p1, p8)
    # cFFN BatchNorm running statistics are global-batch statistics on both.
    b1, b8 = jax.device_get(s1.batch_stats), jax.device_get(s8.batch_stats)
    assert jax.tree_util.tree_leaves(b1), "deit_tiny_hal has cFFN BatchNorm statistics"
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), b1, b8)
    e1 = [m for m in read_metrics(str(tmp_path / "one")) if "eval/top1" in m][-1]
    e8 = [m for m in read_metrics(str(tmp_path / "eight")) if "eval/top1" in m][-1]
    assert e1["eval/top1"] == e8["eval/top1"]
    assert e8["eval/loss"] == pytest.approx(e1["eval/loss"], rel=1e-5)

    # The 8-device checkpoint restores onto a 1-device mesh (another mesh and device count): the
    # run resumes at its last step, so nothing is trained and the state is the saved one.
    restored = train_and_evaluate(one, str(tmp_path / "eight"))
    assert int(restored.step) == 4
    assert restored.params["blocks_0"]["attn"]["qkv"]["kernel"].sharding.num_devices == 1
    r = jax.device_get(restored.params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), r, p8)
