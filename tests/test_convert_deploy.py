"""Deploy export (`python -m halluvit_jax.convert deploy`): fold, drop training state, round trip.

The training checkpoint is written with the trainer's own checkpointing helpers (same layout as
`train.py`), with non-trivial BatchNorm statistics so that the fold actually changes numbers.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import halluvit_jax as hv
from halluvit_jax.convert.__main__ import main as cli_main
from halluvit_jax.checkpoint.io import read_variables_dir
from halluvit_jax.convert.deploy import export_deploy, load_deploy

OVERRIDES = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 4, "mlp_ratio": 4.0, "num_classes": 7}


def _perturb(tree, rng, scale):
    return jax.tree_util.tree_map(lambda a: np.asarray(a) + scale * rng.normal(size=np.shape(a)).astype(np.float32), tree)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir of a reduced deit_tiny_hal: step 5, EMA, Adam state, non-trivial BN stats."""
    from halluvit_jax.train import checkpointing

    root = tmp_path_factory.mktemp("deploy") / "run"
    model = hv.create_model("deit_tiny_hal", **OVERRIDES)
    v = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))  # eager: jit(init) compiles slowly
    rng = np.random.default_rng(0)
    params = _perturb(v["params"], rng, 0.02)
    stats = jax.tree_util.tree_map(
        lambda a: (rng.normal(size=a.shape) * 0.3).astype(np.float32) if a.ndim and np.all(a == 0)
        else rng.uniform(0.5, 2.0, size=a.shape).astype(np.float32), v["batch_stats"]
    )
    state = {
        "step": np.asarray(5, np.int32),
        "params": params,
        "batch_stats": stats,
        "opt_state": {"mu": _perturb(params, rng, 0.01), "nu": _perturb(params, rng, 0.01)},
        "ema_params": _perturb(params, rng, 0.01),
    }
    manager = checkpointing.create_checkpoint_manager(str(root / "checkpoints"), async_save=False)
    checkpointing.save(manager, 5, state, None)
    manager.wait_until_finished()
    manager.close()
    config = {
        "model_name": "deit_tiny_hal",
        "model": {k: v for k, v in OVERRIDES.items() if k != "num_classes"},
        "input": {"image_size": 32, "crop_pct": 1.0, "mean": [0.3, 0.3, 0.3], "std": [0.35, 0.35, 0.35]},
    }
    (root / "config.json").write_text(json.dumps(config))
    return root, state


def _eval_logits(variables, x, deploy=False):
    return np.asarray(jax.jit(hv.create_model("deit_tiny_hal", **OVERRIDES, deploy=deploy).apply)(variables, x))


def test_deploy_export_round_trip(workdir, tmp_path, capsys):
    root, state = workdir
    out = tmp_path / "export"
    assert cli_main(["deploy", "--checkpoint", str(root), "--output", str(out)]) == 0
    # Ordinary file modes (0644 / 0755 under umask 022), not mkdtemp's 0700 / 0600.
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, _, files in os.walk(out):
        assert os.stat(dirpath).st_mode & 0o777 == 0o777 & ~umask, dirpath
        for name in files:
            assert os.stat(os.path.join(dirpath, name)).st_mode & 0o777 == 0o666 & ~umask, name
    assert "deploy-form deit_tiny_hal" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["model.safetensors", "model_card.json", "variables"]

    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)), jnp.float32)
    want = _eval_logits({"params": state["params"], "batch_stats": state["batch_stats"]}, x)
    variables, card = read_variables_dir(out)
    assert set(variables) == {"params"}  # cFFN statistics folded; no optimizer state, no EMA
    assert "branch_kernel" not in json.dumps(jax.tree_util.tree_map(lambda a: 0, variables))
    deploy_apply = jax.jit(hv.create_model(card["model"], deploy=True, **card["overrides"]).apply)
    got = np.asarray(deploy_apply(variables, x))
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5

    flat, _ = read_variables_dir(out, use_safetensors=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, flat, variables)

    model, v2, card2 = load_deploy(out, use_safetensors=True)
    assert model.hal.deploy and card2 == card
    np.testing.assert_allclose(np.asarray(deploy_apply(v2, x)), got, rtol=0, atol=0)

    assert card["deploy"] is True and card["model"] == "deit_tiny_hal"
    assert card["input"]["input_size"] == 32 and card["input"]["num_classes"] == 7
    assert card["input"]["mean"] == [0.3, 0.3, 0.3] and card["input"]["std"] == [0.35, 0.35, 0.35]
    # Complexity: parameters of an independently built deploy model; MACs less than training form.
    deploy_model = hv.create_model("deit_tiny_hal", **OVERRIDES, deploy=True)
    n = sum(a.size for a in jax.tree_util.tree_leaves(jax.eval_shape(deploy_model.init, jax.random.key(0), x[:1])))
    assert card["complexity"]["params"] == n
    assert card["complexity"]["macs"] > 0 and card["source"]["step"] == 5


@pytest.mark.slow  # ~6 s; the fast tier keeps the round trip
def test_deploy_export_ema(workdir, tmp_path):
    root, state = workdir
    out = tmp_path / "ema"
    assert cli_main(["deploy", "--checkpoint", str(root), "--output", str(out), "--ema"]) == 0
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)), jnp.float32)
    want = _eval_logits({"params": state["ema_params"], "batch_stats": state["batch_stats"]}, x)
    variables, _ = read_variables_dir(out)
    got = _eval_logits(variables, x, deploy=True)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


@pytest.mark.parametrize("case", ["existing_output", "wrong_model", "truncated"])
def test_deploy_errors_one_line_nothing_written(workdir, tmp_path, case, capsys):
    import shutil

    root, _ = workdir
    src = root
    out = tmp_path / "out"
    args = ["deploy", "--checkpoint", str(src), "--output", str(out)]
    if case == "existing_output":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    elif case == "wrong_model":
        args += ["--model", "deit_tiny"]  # the baseline: no hMHSA / cFFN
    else:  # a copy of the workdir whose array files were cut short
        src = tmp_path / "copy"
        shutil.copytree(root, src)
        for dirpath, _, files in os.walk(src / "checkpoints" / "5" / "state"):
            for name in files:
                if os.sep + "d" in dirpath or name.startswith("manifest"):
                    path = os.path.join(dirpath, name)
                    size = os.path.getsize(path)
                    with open(path, "r+b") as f:
                        f.truncate(size // 2)
        args[2] = str(src)
    assert cli_main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    if case == "existing_output":
        assert os.listdir(out) == ["keep.txt"] and "--overwrite" in err
    else:
        assert not out.exists()
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]  # no staging leftovers
    if case == "wrong_model":
        assert "does not match" in err
    if case == "truncated":
        assert "truncated or corrupted" in err


NEXTVIT = {"depths": (1, 1, 5, 1), "stem_chs": (16, 16, 24), "conv_widths": (32, 48, 48, 96),
           "transformer_widths": (128, 128, 128), "head_dim": 16, "num_classes": 7}


@pytest.mark.slow  # ~30 s of NextViT compiles
def test_nextvit_baseline_export_merges_pre_batchnorms(tmp_path):
    """A NextViT baseline's export is timm's merge_pre_bn form: no block pre-BN, loads as the
    merged model, gives the training form's eval logits; the converted source still loads as is."""
    from halluvit_jax.checkpoint.io import save_variables

    model = hv.create_model("nextvit_small", **NEXTVIT)
    v = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    rng = np.random.default_rng(1)
    stats = jax.tree_util.tree_map(lambda a: rng.uniform(0.5, 2.0, a.shape).astype(np.float32), v["batch_stats"])
    variables = {"params": _perturb(v["params"], rng, 0.1), "batch_stats": stats}
    src = save_variables(tmp_path / "converted", variables, {"model": "nextvit_small", "overrides": NEXTVIT})
    card = export_deploy(src, tmp_path / "export")
    assert card["check"]["max_rel_logit_error_vs_training_form"] < 1e-5

    net, folded, _ = load_deploy(tmp_path / "export")
    assert net.pre_bn_merged()
    block = folded["params"]["stages_1"]["blocks_0"]  # the stage-1 NTB
    assert not {"norm1", "sr_norm", "norm2"} & set(block) and "norm" in block["mhca"]
    assert "norm" not in folded["params"]["stages_0"]["blocks_0"]
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 64, 64, 3)), jnp.float32)
    want = np.asarray(jax.jit(model.apply)(variables, x))
    got = np.asarray(jax.jit(net.apply)(folded, x))
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
    assert card["complexity"]["params"] == sum(a.size for a in jax.tree_util.tree_leaves(folded["params"]))

    unmerged, merged = hv.load(src), hv.load(src, deploy=True)
    assert not unmerged.deploy and not unmerged.model.pre_bn_merged() and "norm1" in unmerged.variables["params"]["stages_1"]["blocks_0"]
    assert merged.deploy and merged.model.pre_bn_merged()
