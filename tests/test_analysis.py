"""CCS, attention figures and the analysis CLI (halluvit_jax.analysis), plus the ablation presets."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import halluvit_jax as hv
from halluvit_jax.analysis import ccs as ccs_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4, "num_classes": 10}


def _loop_block_score(maps: np.ndarray) -> tuple[np.ndarray, float]:
    """Independent reference: explicit loops over images, query rows and head pairs."""
    b, h, n, _ = maps.shape
    sim = np.zeros((h, h))
    for i in range(h):
        for j in range(h):
            total = 0.0
            for bb in range(b):
                for q in range(n):
                    u, v = maps[bb, i, q], maps[bb, j, q]
                    total += float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))
            sim[i, j] = total / (b * n)
    pairs = [sim[i, j] for i in range(h) for j in range(i + 1, h)]
    return sim, float(np.mean(pairs))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# CCS maths


def test_ccs_identical_heads_is_one():
    row = _softmax(np.random.default_rng(0).normal(size=(2, 1, 5, 7)))
    maps = np.repeat(row, 4, axis=1)
    np.testing.assert_allclose(ccs_lib.head_similarity(maps), np.ones((4, 4)), atol=1e-12)
    assert ccs_lib.block_score(maps) == pytest.approx(1.0, abs=1e-12)
    assert ccs_lib.ccs([maps, maps]) == pytest.approx(1.0, abs=1e-12)


def test_ccs_orthogonal_one_hot_maps_is_zero():
    h, n, nk = 3, 4, 12
    maps = np.zeros((1, h, n, nk))
    for i in range(h):
        for q in range(n):
            maps[0, i, q, i * n + q] = 1.0  # every head attends to keys no other head uses
    assert ccs_lib.block_score(maps) == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(ccs_lib.head_similarity(maps), np.eye(h), atol=1e-12)


def test_ccs_matches_loop_reference_on_random_maps():
    rng = np.random.default_rng(1)
    blocks = [_softmax(rng.normal(size=(3, 4, 5, 6)) * 2), _softmax(rng.normal(size=(3, 6, 5, 9)))]
    sims, scores = zip(*[_loop_block_score(m) for m in blocks])
    for m, s in zip(blocks, sims):
        np.testing.assert_allclose(ccs_lib.head_similarity(m), s, rtol=1e-10)
    assert ccs_lib.ccs(blocks) == pytest.approx(np.mean(scores), rel=1e-10)
    # Streaming over uneven batches gives the same numbers as the whole set at once.
    acc = ccs_lib.CCSAccumulator()
    for lo, hi in ((0, 1), (1, 3)):
        acc.update([(f"b{k}", m[lo:hi]) for k, m in enumerate(blocks)])
    res = acc.result()
    assert res["num_images"] == 3
    assert [b["score"] for b in res["blocks"]] == pytest.approx(list(scores), rel=1e-10)
    assert res["ccs"] == pytest.approx(np.mean(scores), rel=1e-10)


# ---------------------------------------------------------------------------------------------
# Reading the sown maps of real models


def test_sown_maps_order_real_then_hallucinated():
    """With variant 'copy' each hallucinated head equals its real head: head i == head i + h/2."""
    model = hv.create_model("deit_tiny_hal", hal_variant="copy", **dict(TINY, depth=1))
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    v = model.init(jax.random.key(1), x)
    blocks = ccs_lib.attention_maps(model, v, x)
    assert [n for n, _ in blocks] == ["blocks_0/attn"]
    for _, maps in blocks:
        assert maps.shape == (2, 4, 17, 17)
        np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(maps[:, :2], maps[:, 2:])
        sim = ccs_lib.head_similarity(maps)
        assert sim[0, 2] == pytest.approx(1.0, abs=1e-6) and sim[1, 3] == pytest.approx(1.0, abs=1e-6)
    assert ccs_lib.hal_heads(4, True) == ["real 0", "real 1", "hal 0", "hal 1"]


def test_collect_attention_natural_block_order():
    maps = np.full((1, 2, 3, 3), 1 / 3)
    tree = {"intermediates": {f"blocks_{i}": {"attn": {"attn": (maps,)}} for i in (10, 2, 1)}}
    assert [n for n, _ in ccs_lib.collect_attention(tree)] == ["blocks_1/attn", "blocks_2/attn", "blocks_10/attn"]
    with pytest.raises(ValueError, match="mutable=\\['intermediates'\\]"):
        ccs_lib.collect_attention({"intermediates": {}})


# ---------------------------------------------------------------------------------------------
# CLI on tiny checkpoints


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    from halluvit_jax.checkpoint.io import save_variables

    model = hv.create_model("deit_tiny_hal", **TINY)
    v = model.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))
    out = str(tmp_path_factory.mktemp("conv") / "tiny_hal")
    card = {"model": "deit_tiny_hal", "overrides": TINY,
            "input": {"input_size": 32, "crop_pct": 1.0, "mean": [0.3125] * 3, "std": [0.356] * 3}}
    save_variables(out, jax.device_get(v), card)
    return out, model, v


def test_cli_ccs_json_matches_loop_reference(converted_dir, tmp_path, capsys):
    from halluvit_jax.analysis.__main__ import main
    from halluvit_jax.analysis.images import demo_images

    path, model, v = converted_dir
    out = tmp_path / "ccs.json"
    assert main(["ccs", "--checkpoint", path, "--data", "demo", "--max-images", "3", "--batch-size", "2",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["model"] == "deit_tiny_hal" and res["hal"] and res["num_images"] == 3
    imgs = demo_images()[:3].astype(np.float32) / 255.0
    x = (imgs - 0.3125) / 0.356
    _, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(v, x)
    ref = [_loop_block_score(np.asarray(state["intermediates"][f"blocks_{k}"]["attn"]["attn"][0]))[1]
           for k in range(2)]
    assert [b["score"] for b in res["blocks"]] == pytest.approx(ref, rel=1e-5)
    assert res["ccs"] == pytest.approx(np.mean(ref), rel=1e-5)
    assert f"CCS {np.mean(ref):.4f}" in printed


@pytest.mark.slow  # ~5 s; the fast tier keeps the CLI on a deploy export
def test_cli_ccs_training_checkpoint_and_image_dir(tmp_path):
    """A training workdir (orbax 'state' + config.json) and a directory of PNGs as data."""
    import matplotlib.image as mpimg

    from halluvit_jax.analysis.__main__ import main
    from halluvit_jax.train import checkpointing

    fields = dict(TINY, hal=False)
    model = hv.create_model("deit_tiny", **fields)
    v = jax.device_get(model.init(jax.random.key(4), jnp.zeros((1, 32, 32, 3))))
    workdir = tmp_path / "run"
    manager = checkpointing.create_checkpoint_manager(str(workdir / "checkpoints"), async_save=False)
    checkpointing.save(manager, 7, {"step": 7, "params": v["params"], "batch_stats": {}}, None)
    manager.wait_until_finished()
    manager.close()
    (workdir / "config.json").write_text(json.dumps({
        "model_name": "deit_tiny", "model": {k: v for k, v in fields.items() if k != "num_classes"},
        "input": {"image_size": 32, "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3}}))
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        mpimg.imsave(images / f"{i}.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    out = tmp_path / "ccs.json"
    assert main(["ccs", "--checkpoint", str(workdir), "--data", str(images), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["model"] == "deit_tiny" and not res["hal"] and res["num_images"] == 3
    assert len(res["blocks"]) == 2 and 0.0 < res["ccs"] <= 1.0


def test_cli_attention_writes_png_of_expected_size(converted_dir, tmp_path):
    import matplotlib.image as mpimg

    from halluvit_jax.analysis.__main__ import main

    path, _, _ = converted_dir
    img = tmp_path / "digit.png"
    mpimg.imsave(img, np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    maps, sim = tmp_path / "maps.png", tmp_path / "sim.png"
    assert main(["attention", "--checkpoint", path, "--image", str(img), "--block", "1", "--query", "5",
                 "--out", str(maps), "--similarity-out", str(sim), "--dpi", "50"]) == 0
    # 4 heads + the input panel -> 5 columns of 2.2 in, 1 row of 2.2 in + 0.5 in title, at 50 dpi.
    assert mpimg.imread(maps).shape[:2] == (135, 550)
    # 2 blocks -> 2 columns of 2.4 in + 0.8 in colour bar; 1 row of 2.4 + 0.5 in.
    assert mpimg.imread(sim).shape[:2] == (145, 280)
    assert maps.stat().st_size > 5000 and sim.stat().st_size > 5000


def test_cli_bad_block_is_a_clear_error(converted_dir, capsys):
    from halluvit_jax.analysis.__main__ import main

    path, _, _ = converted_dir
    assert main(["attention", "--checkpoint", path, "--image", "demo:0", "--block", "9", "--out", "x.png"]) == 2
    assert "--block 9 is out of range: the model has 2 attention blocks" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Ablation presets


def _config(arg):
    from halluvit_jax.cli import load_config

    return load_config(os.path.join(ROOT, "configs", "ablations", "demo.py"), arg)


def test_ablation_presets_build_and_plain_ffn_matches_cffn_cost():
    from halluvit_jax.analysis.ablations import ABLATIONS
    from halluvit_jax.complexity import count_macs, count_params

    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    configs = {name: _config(f"ablation={name},seed=3,epochs=2") for name in ABLATIONS}
    assert all(c.seed == 3 and c.total_epochs == 2.0 for c in configs.values())
    assert configs["baseline"].model.hal is None and configs["chh"].model.hal.variant == "chh"
    assert configs["w1"].model.hal.factorize == "w1" and configs["r3"].model.hal.num_branches == 3
    cost = {}
    for name in ("baseline", "ihh_chh", "plain_ffn", "t1_2", "t3_4"):
        c = configs[name]
        model = hv.create_model(c.model_name, num_classes=10, deploy=True, **c.model)
        v = jax.eval_shape(model.init, jax.random.key(0), x)
        cost[name] = (count_params(v), count_macs(model, x.shape, variables=v))
    assert cost["baseline"][1] > cost["ihh_chh"][1]  # the hal model is cheaper
    # Table 5: the plain FFN's ratio is chosen for the cFFN's cost (t = 2/3) -- within 0.5%.
    assert abs(cost["plain_ffn"][1] / cost["ihh_chh"][1] - 1) < 0.005
    assert abs(cost["plain_ffn"][0] / cost["ihh_chh"][0] - 1) < 0.005
    assert cost["t1_2"][1] < cost["ihh_chh"][1] < cost["t3_4"][1]
    with pytest.raises(ValueError, match="Unknown ablation 'nope'"):
        _config("ablation=nope")
