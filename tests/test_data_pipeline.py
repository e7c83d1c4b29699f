"""grain pipelines over the prepared fake ImageNet and the demo: batches, sharding, eval padding,
determinism and exact resume through a real orbax CheckpointManager."""

from __future__ import annotations

import data_fixtures as dfx
import numpy as np
import pytest

from halluvit_jax.data import config as config_lib
from halluvit_jax.data import pipeline, registry


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return dfx.prepared_fake_imagenet(tmp_path_factory)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return dfx.prepared_demo(tmp_path_factory)


def _cfg(data_dir, **kw):
    c = config_lib.default_input_config()
    c.data_dir = data_dir
    c.num_threads = 2
    c.prefetch_buffer_size = 8
    c.update(kw)
    return c


def _demo_cfg(data_dir, **kw):
    c = config_lib.demo_input_config(data_dir)
    c.num_threads = 2
    c.prefetch_buffer_size = 16
    c.update(kw)
    return c


def _labels_by_index(name, split, data_dir):
    src = registry.data_source(name, split, data_dir)
    return np.array([int(src[i]["label"]) for i in range(len(src))])


def test_train_batches_imagenet_224(imagenet):
    fake, data_dir, _ = imagenet
    cfg = _cfg(data_dir)
    it = pipeline.create_train_iter(cfg, global_batch_size=4, seed=0, process_index=0,
                                    process_count=1)
    synsets = dfx.imagenet_synsets()
    valid = {synsets.index(s) for s in dfx.SYNSETS}
    for _ in range(5):  # > 1 epoch of 16 images
        b = next(it)
        assert b["image"].shape == (4, 224, 224, 3) and b["image"].dtype == np.float32
        assert b["label"].shape == (4,) and b["label"].dtype == np.int32
        assert set(b["label"].tolist()) <= valid
        assert np.isfinite(b["image"]).all()
    assert pipeline.num_examples(cfg, "train") == len(fake.train)
    assert pipeline.num_examples(cfg, "validation") == len(fake.validation)
    assert pipeline.num_classes(cfg) == 1000


def test_eval_batches_are_padded_and_masked_in_order(imagenet):
    _fake, data_dir, _ = imagenet
    cfg = _cfg(data_dir, image_size=64)
    expected = _labels_by_index("imagenet2012", "validation", data_dir)
    batches = list(pipeline.create_eval_iter(cfg, global_batch_size=4, process_index=0,
                                             process_count=1))
    assert len(batches) == 2  # 6 images -> 4 + (2 + 2 padding)
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert mask.tolist() == [True] * 6 + [False] * 2
    np.testing.assert_array_equal(labels[:6], expected)
    assert all(b["image"].shape == (4, 64, 64, 3) for b in batches)
    assert (batches[-1]["image"][2:] == 0).all()
    # Re-iterable: a second pass gives the same data.
    again = list(pipeline.create_eval_iter(cfg, global_batch_size=4, process_index=0,
                                           process_count=1))
    np.testing.assert_array_equal(again[0]["image"], batches[0]["image"])


def test_eval_sharded_over_processes_is_exact(demo_dir):
    cfg = _demo_cfg(demo_dir)
    expected = _labels_by_index("halluvit_digits", "validation", demo_dir)
    per_proc = [list(pipeline.create_eval_iter(cfg, global_batch_size=64, process_index=p,
                                               process_count=2)) for p in range(2)]
    assert len(per_proc[0]) == len(per_proc[1])  # same number of steps on every host
    seen = []
    for batches in per_proc:
        for b in batches:
            assert b["image"].shape == (32, 32, 32, 3)
            seen.extend(b["label"][b["mask"]].tolist())
    assert len(seen) == 297
    np.testing.assert_array_equal(np.array(seen), expected)


def test_train_shuffles_each_epoch_and_shards_disjointly(demo_dir):
    cfg = _demo_cfg(demo_dir)
    n = 1500
    one = pipeline.train_order_indices(cfg, seed=3, num=2 * n)
    assert sorted(one[:n]) == list(range(n)) and sorted(one[n:]) == list(range(n))
    assert one[:n] != one[n:]  # fresh shuffle per epoch
    assert one[:n] != list(range(n))
    p0 = pipeline.train_order_indices(cfg, seed=3, num=n // 2, process_index=0, process_count=2)
    p1 = pipeline.train_order_indices(cfg, seed=3, num=n // 2, process_index=1, process_count=2)
    assert not set(p0) & set(p1) and len(set(p0) | set(p1)) == n
    other = pipeline.train_order_indices(cfg, seed=4, num=n)
    assert other != one[:n]


def test_train_labels_follow_the_order(demo_dir):
    cfg = _demo_cfg(demo_dir)
    labels = _labels_by_index("halluvit_digits", "train", demo_dir)
    order = pipeline.train_order_indices(cfg, seed=0, num=64)
    it = pipeline.create_train_iter(cfg, global_batch_size=32, seed=0, process_index=0,
                                    process_count=1)
    got = np.concatenate([next(it)["label"], next(it)["label"]])
    np.testing.assert_array_equal(got, labels[order])


def test_repeated_augmentation(demo_dir):
    cfg = _demo_cfg(demo_dir, repeated_aug=3)
    order = pipeline.train_order_indices(cfg, seed=0, num=1500)
    assert all(order[i] == order[i - i % 3] for i in range(1500))  # consecutive triples
    assert len(set(order)) == 500  # epoch length unchanged: n/3 distinct images x 3
    it = pipeline.create_train_iter(cfg, global_batch_size=6, seed=0, process_index=0,
                                    process_count=1)
    b = next(it)
    assert b["label"][0] == b["label"][1] == b["label"][2]
    assert not np.array_equal(b["image"][0], b["image"][1])  # independent augmentations
    p0 = pipeline.train_order_indices(cfg, seed=0, num=6, process_index=0, process_count=3)
    p1 = pipeline.train_order_indices(cfg, seed=0, num=6, process_index=1, process_count=3)
    assert p0 == p1  # with 3 hosts, each repeat of an image goes to a different host


def test_train_is_deterministic_given_seed(demo_dir):
    cfg = _demo_cfg(demo_dir, train_ops="rrc(scale=0.35-1)|flip|randaug|normalize|erase",
                    randaugment="rand-m9-mstd0.5-inc1", random_erase=0.5)

    def first(seed, n=3):
        it = pipeline.create_train_iter(cfg, global_batch_size=16, seed=seed, process_index=0,
                                        process_count=1)
        return [next(it) for _ in range(n)]

    a, b, c = first(0), first(0), first(1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_global_batch_must_divide(demo_dir):
    cfg = _demo_cfg(demo_dir)
    with pytest.raises(ValueError, match="multiple of process_count"):
        pipeline.create_train_iter(cfg, global_batch_size=30, seed=0, process_index=0,
                                   process_count=4)
    it = pipeline.create_train_iter(cfg, global_batch_size=32, seed=0, process_index=1,
                                    process_count=4)
    assert next(it)["image"].shape == (8, 32, 32, 3)  # local batch


def test_train_iterator_resumes_exactly(demo_dir, tmp_path):
    """Save the iterator with the train state in a real orbax CheckpointManager, restore it
    into a freshly created iterator: the next batches are bit-identical (augmentation too)."""
    import orbax.checkpoint as ocp

    cfg = _demo_cfg(demo_dir, train_ops="rrc(scale=0.35-1)|randaug|normalize|erase",
                    randaugment="rand-m9-mstd0.5-inc1", random_erase=0.5)
    kw = {"global_batch_size": 32, "seed": 7, "process_index": 0, "process_count": 1}
    it = pipeline.create_train_iter(cfg, **kw)
    for _ in range(50):  # crosses the 1500-image epoch boundary (46.9 batches/epoch)
        next(it)
    state = {"step": np.asarray(50, np.int32), "w": np.arange(4, dtype=np.float32)}
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("state", pipeline.DATA_ITEM_NAME))
    mngr.save(50, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=pipeline.iterator_checkpoint_args_save(it)))
    mngr.wait_until_finished()
    expected = [next(it) for _ in range(3)]

    fresh = pipeline.create_train_iter(cfg, **kw)
    restored = mngr.restore(50, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state),
        data=pipeline.iterator_checkpoint_args_restore(fresh)))
    assert int(restored["state"]["step"]) == 50
    got = [next(fresh) for _ in range(3)]
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e["image"], g["image"])
        np.testing.assert_array_equal(e["label"], g["label"])
    mngr.close()
    not_restored = next(pipeline.create_train_iter(cfg, **kw))
    assert not np.array_equal(not_restored["image"], expected[0]["image"])
    # get_state/set_state round trip too.
    st = it.get_state()
    nxt = next(it)
    other = pipeline.create_train_iter(cfg, **kw)
    other.set_state(st)
    np.testing.assert_array_equal(next(other)["image"], nxt["image"])


def test_demo_smoke_train_and_eval(demo_dir):
    cfg = _demo_cfg(demo_dir)
    assert pipeline.num_classes(cfg) == 10
    assert pipeline.num_examples(cfg, "train") == 1500
    assert pipeline.num_examples(cfg, "validation") == 297
    b = next(pipeline.create_train_iter(cfg, global_batch_size=128, seed=0))
    assert b["image"].shape == (128, 32, 32, 3)
    # normalized with the demo mean/std: roughly standardized
    assert abs(float(b["image"].mean())) < 0.5 and 0.6 < float(b["image"].std()) < 1.5
    batches = list(pipeline.create_eval_iter(cfg, global_batch_size=128))
    assert sum(int(x["mask"].sum()) for x in batches) == 297
