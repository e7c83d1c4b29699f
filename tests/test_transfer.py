"""Transfer (configs/transfer.py, issue 17): a tiny demo model trained on the embedded digits is
transferred to a second small real dataset, a CIFAR-100 archive in the real format built here from
the digits it never saw, at another resolution, through ``train.py``.

The second dataset (tests/data_fixtures.digits_as_cifar100): the demo's 297 *validation* digits
(held out of the pretraining), relabelled as 10 of CIFAR-100's 100 fine classes, 200 train / 97
test, fine-tuned at 48x48 instead of the 32x32 of pretraining (DeiT's 4x4 position grid resampled
to 6x6). Pretrained features are about the same digits, so transfer must beat training from
scratch for the same steps; what this shows is that the pretrained weights arrive intact through
the new head, the resampled position embeddings and the trainer, not a transfer result on real
CIFAR-100 (docs/training.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import data_fixtures as dfx
import jax
import numpy as np
import pytest
from test_train_common import CONFIGS, REPO, TINY_CLI, TINY_MODEL, final_state, load_config, subprocess_env

from halluvit_jax import loading
from halluvit_jax.checkpoint.io import cffn_folded
from halluvit_jax.checkpoint.trees import has_training_branches
from halluvit_jax.models import create_model, resample_pos_embed
from halluvit_jax.reparam import reparameterize
from halluvit_jax.train import checkpointing

# Every case trains first (a 4-step checkpoint: ~20 s; 1000 pretraining steps: ~1 min).
pytestmark = pytest.mark.slow

PRETRAIN_STEPS = 1000  # the tiny model on the digits: ~60% validation top-1 (chance 10%)
TRANSFER_STEPS = 60  # 5 epochs of the 200 transfer images
RES = 48


def _train(config: str, workdir: str, *flags: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), f"--config={config}", f"--workdir={workdir}",
         "--config.tensorboard=False", "--config.mesh.num_devices=1", "--config.log_every_steps=100", *flags],
        env=subprocess_env(num_devices=1), cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A workdir of the tiny demo model after PRETRAIN_STEPS steps on the digits' train split."""
    workdir = str(tmp_path_factory.mktemp("transfer") / "pretrained")
    n = PRETRAIN_STEPS
    _train(f"{os.path.join(CONFIGS, 'demo.py')}:data_dir={dfx.prepared_demo(tmp_path_factory)}", workdir,
           *TINY_CLI, "--config.global_batch_size=16", f"--config.total_steps={n}", "--config.optim.warmup_steps=2",
           "--config.optim.lr=3e-3", "--config.optim.lr_base_batch_size=16", f"--config.checkpoint_every_steps={n}",
           "--config.eval_every_steps=-1", "--config.input.num_threads=2")
    return workdir


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 4-step tiny demo run (in-process): a real training workdir of the same model for the
    tests that check how a checkpoint is merged and configured, not what it learned."""
    from test_train_reliability import tiny_argv, train_main

    workdir = str(tmp_path_factory.mktemp("transfer") / "short")
    assert train_main(tiny_argv(dfx.prepared_demo(tmp_path_factory), workdir)) == 0
    return workdir


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    """data_dir holding ``cifar100`` prepared by the package's builder from the digits archive."""
    from halluvit_jax.data import prepare

    root = tmp_path_factory.mktemp("digits_cifar")
    dfx.digits_as_cifar100(root / "manual")
    assert prepare.main(["cifar100", "--manual_dir", str(root / "manual"), "--data_dir", str(root / "data")]) == 0
    return str(root / "data")


def _transfer(init: str, data_dir: str, workdir: str, *flags: str) -> subprocess.CompletedProcess:
    """configs/transfer.py:model=demo,dataset=cifar100 at RES with the tiny model, the same steps and
    learning rate whether ``init`` is a checkpoint or '' (from scratch)."""
    arg = f"model=demo,dataset=cifar100,res={RES},runlocal,data_dir={data_dir}" + (f",init={init}" if init else "")
    tiny = [f for f in TINY_CLI if "img_size" not in f]  # the config sets img_size = res
    n = TRANSFER_STEPS
    return _train(f"{os.path.join(CONFIGS, 'transfer.py')}:{arg}", workdir, *tiny, f"--config.total_steps={n}",
                  f"--config.eval_every_steps={n}", f"--config.checkpoint_every_steps={n}", "--config.optim.lr=5e-3",
                  "--config.optim.lr_base_batch_size=16", "--config.input.eval_split=test", *flags)


def _final_metrics(workdir: str) -> dict:
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        return json.load(f)


def test_transfer_from_a_demo_checkpoint_beats_training_from_scratch(pretrained, cifar_dir, tmp_path):
    transfer = _transfer(pretrained, cifar_dir, str(tmp_path / "transfer"))
    scratch = _transfer("", cifar_dir, str(tmp_path / "scratch"))
    log = transfer.stdout + transfer.stderr
    assert "Initialized from" in log and "Initialized from" not in scratch.stdout + scratch.stderr
    assert "New classifier head, zero-initialized: head/bias (10,) -> (100,), head/kernel (32, 10) -> (32, 100)." in log
    assert "Resampling pos_embed from (1, 17, 32) to (1, 37, 32)" in log
    assert "Freshly initialized" not in log and "Unused" not in log  # every other leaf came from the checkpoint

    step, state = final_state(str(tmp_path / "transfer"))
    assert step == TRANSFER_STEPS
    assert state["params"]["head"]["kernel"].shape == (32, 100)
    assert state["params"]["pos_embed"].shape == (1, 1 + (RES // 8) ** 2, 32)
    with open(tmp_path / "transfer" / "config.json") as f:
        config = json.load(f)
    assert config["model"]["img_size"] == RES and config["init_reinit_regex"] == "^head/"

    t, s = _final_metrics(str(tmp_path / "transfer")), _final_metrics(str(tmp_path / "scratch"))
    print(f"after {TRANSFER_STEPS} steps on 200 images, top-1 on 97: transfer {t['eval/top1']:.3f} "
          f"(loss {t['eval/loss']:.3f}), scratch {s['eval/top1']:.3f} (loss {s['eval/loss']:.3f})")
    assert t["eval/top1"] >= s["eval/top1"] + 0.15 and t["eval/loss"] < s["eval/loss"], (t, s)


def test_merge_starts_the_transfer_from_the_checkpoint_with_a_zero_head(checkpoint):
    """The trainer's init: every leaf from the checkpoint, pos_embed resampled to the new grid,
    a zero head of the new class count; what else differs is one error line."""
    loaded = checkpointing.read_pretrained(checkpoint)
    model = create_model("deit_tiny_hal", **{**TINY_MODEL, "img_size": RES, "num_classes": 100})
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, RES, RES, 3), np.float32)))
    fresh = jax.tree_util.tree_map(lambda a: np.ones(a.shape, a.dtype), dict(shapes))
    merged = checkpointing.merge_pretrained(fresh, loaded, reinit_regex="^head/", where=checkpoint)
    p, q = merged["params"], loaded["params"]
    assert not p["head"]["kernel"].any() and not p["head"]["bias"].any() and p["head"]["kernel"].shape == (32, 100)
    np.testing.assert_array_equal(p["pos_embed"], resample_pos_embed(q["pos_embed"], (RES // 8, RES // 8)))
    same = {k: v for k, v in jax.tree_util.tree_flatten_with_path(merged)[0]
            if not jax.tree_util.keystr(k).startswith(("['params']['head']", "['params']['pos_embed']"))}
    ref = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
    assert same and len(same) == len(ref) - 3  # all but head kernel, bias and pos_embed
    for k, v in same.items():
        np.testing.assert_array_equal(v, ref[k], err_msg=jax.tree_util.keystr(k))

    # Another width: one line naming the leaf. A deploy export into a training-form model: one line.
    wide = jax.tree_util.tree_map(lambda a: np.ones(a.shape, a.dtype), dict(jax.eval_shape(
        lambda: create_model("deit_tiny_hal", **{**TINY_MODEL, "embed_dim": 48}).init(
            jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)))))
    with pytest.raises(loading.CheckpointMismatchError, match=r"^init_from checkpoint: params/\S+ has shape \(.*\), the model \(.*\); only the classifier head"):
        checkpointing.merge_pretrained(wide, loaded)
    with pytest.raises(loading.CheckpointMismatchError, match="holds the cFFN folded .*model.hal.deploy=True"):
        checkpointing.merge_pretrained(fresh, reparameterize(loaded), where="export")


def test_transfer_config_resolution_head_recipe_and_a_folded_init(checkpoint, tmp_path):
    from halluvit_jax.checkpoint.io import save_variables

    c = load_config("transfer", "model=deit_s_hal,dataset=cifar100,init=/none")
    assert (c.model_name, c.model.img_size, c.input.image_size) == ("deit_small_hal", 384, 384)
    assert (c.input.dataset, c.input.train_split, c.input.eval_split) == ("cifar100", "train", "test")
    assert (c.init_from, c.init_reinit_regex, c.model.hal.deploy) == ("/none", "^head/", False)
    assert (c.global_batch_size, c.optim.name, c.optim.lr, c.optim.lr_base_batch_size) == (768, "adamw", 5e-6, 512)
    assert (c.total_epochs, c.optim.warmup_epochs, c.optim.weight_decay, c.input.repeated_aug) == (1000.0, 5.0, 0.05, 3)
    dogs = load_config("transfer", "model=pvt_v2_b1_hal,dataset=stanford_dogs,init=/none")
    assert dogs.input.image_size == 448 and "img_size" not in dogs.model  # PVTv2 takes any resolution
    assert load_config("transfer", "model=deit_s,dataset=stanford_dogs,res=224,init=/none").model.img_size == 224
    other = load_config("transfer", "model=deit_t_hal,dataset=oxford_flowers102,eval_split=validation,init=/none")
    assert (other.input.image_size, other.input.eval_split) == (224, "validation")
    small = load_config("transfer", "model=demo,dataset=cifar100,runlocal")
    assert (small.input.image_size, small.input.train_split, small.input.eval_split, small.total_steps) == (
        32, "train[:256]", "test[:64]", 10)
    assert load_config("transfer", "model=demo,dataset=demo,runlocal").prepare_demo
    with pytest.raises(ValueError, match="Transfer needs init="):
        load_config("transfer", "model=deit_s_hal,dataset=cifar100")

    # A deploy export (folded cFFN) is trained folded; a training workdir in training form.
    export = str(tmp_path / "export")
    save_variables(export, reparameterize(checkpointing.read_pretrained(checkpoint)),
                   {"model": "deit_tiny_hal", "overrides": TINY_MODEL, "deploy": True})
    assert cffn_folded(export) and not cffn_folded(checkpoint)
    assert load_config("transfer", f"model=demo,dataset=cifar100,init={export}").model.hal.deploy is True
    assert load_config("transfer", f"model=demo,dataset=cifar100,init={checkpoint}").model.hal.deploy is False


def test_transfer_from_a_deploy_export_trains_folded_and_beats_scratch(pretrained, cifar_dir, tmp_path):
    """A ``convert deploy`` export as ``init``: the transfer trains the folded cFFN (no BatchNorm
    branches), its workdir loads in deploy form, and it beats scratch over a longer schedule."""
    import halluvit_jax as hv

    export = str(tmp_path / "export")
    proc = subprocess.run([sys.executable, "-m", "halluvit_jax.convert", "deploy", "--checkpoint", pretrained,
                           "--output", export], env=subprocess_env(num_devices=1), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = 4 * TRANSFER_STEPS
    steps = [f"--config.total_steps={n}", f"--config.eval_every_steps={n}", f"--config.checkpoint_every_steps={n}"]
    _transfer(export, cifar_dir, str(tmp_path / "folded"), *steps)
    _transfer("", cifar_dir, str(tmp_path / "scratch"), *steps)
    with open(tmp_path / "folded" / "config.json") as f:
        assert json.load(f)["model"]["hal"]["deploy"] is True
    loaded = hv.load(str(tmp_path / "folded"))
    assert loaded.deploy and not has_training_branches(loaded.variables["params"])
    t, s = _final_metrics(str(tmp_path / "folded")), _final_metrics(str(tmp_path / "scratch"))
    print(f"after {n} steps: transfer from the deploy export {t['eval/top1']:.3f} (loss {t['eval/loss']:.3f}), "
          f"scratch {s['eval/top1']:.3f} (loss {s['eval/loss']:.3f})")
    assert t["eval/top1"] >= s["eval/top1"] + 0.1 and t["eval/loss"] < s["eval/loss"], (t, s)
