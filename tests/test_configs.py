"""The config files in configs/: what they import, their hal twins, fine-tune and ablations."""

from __future__ import annotations

import ast
import glob
import json
import os

import ml_collections
import pytest

import halluvit_jax as hv
from halluvit_jax import config_helpers as ch
from halluvit_jax.analysis.ablations import ABLATIONS, ablate
from halluvit_jax.cli import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
ALL = sorted(glob.glob(os.path.join(CONFIGS, "**", "*.py"), recursive=True))
TWINS = {"deit_s_hal": "deit_s", "deit_t_hal": "deit_t", "pvt_v2_b1_hal": "pvt_v2_b1",
         "nextvit_s_hal": "nextvit_s", "demo": "demo_baseline"}


def _cfg(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    return load_config(os.path.join(CONFIGS, f"{name}.py"), arg)


#: What a config may import of the package besides config_helpers: the tool it exists for.
TOOLS = {"transfer.py": {"halluvit_jax.checkpoint.io.cffn_folded"},  # init= decides the cFFN form
         "ablations/demo.py": {"halluvit_jax.analysis.ablations.ablate"},
         "ablations/imagenet.py": {"halluvit_jax.analysis.ablations.ablate"}}


@pytest.mark.parametrize("path", ALL, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_configs_import_only_the_public_config_helper(path):
    allowed = {"halluvit_jax.config_helpers", *TOOLS.get(os.path.relpath(path, CONFIGS), ())}
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            assert not name.startswith("halluvit_jax") or name in allowed, (path, name)
    assert "spec_from_file_location" not in open(path).read()


@pytest.mark.parametrize("hal, base", sorted(TWINS.items()))
def test_hal_twin_is_its_baseline_plus_the_default_hal_config(hal, base):
    h, b = _cfg(hal).to_dict(), _cfg(base).to_dict()
    assert h["model"].pop("hal") == hv.HalConfig().to_dict()
    assert b["model"].pop("hal") is None
    diff = {k for k in h if h[k] != b[k]}
    assert diff <= {"model_name", "total_epochs", "eval_every_epochs", "checkpoint_every_epochs"}, diff
    assert h["model"] == b["model"]
    assert h["model"]["remat"] == "none" and h["model"]["impl"] == "auto"


def test_config_json_round_trip_builds_the_same_model():
    c = _cfg("demo")
    again = ml_collections.ConfigDict(json.loads(c.to_json()))
    a = hv.create_model(c.model_name, **c.model)
    b = hv.create_model(again.model_name, **again.model)
    assert a.hal == b.hal == hv.HalConfig()
    assert hv.create_model(c.model_name, **_cfg("demo_baseline").model).hal is None


def test_finetune_config_takes_the_preset_and_init():
    c = _cfg("finetune", "model=pvt_v2_b1_hal,init=/tmp/ckpt")
    assert (c.model_name, c.init_from, c.total_epochs, c.optim.lr) == ("pvt_v2_b1_hal", "/tmp/ckpt", 30.0, 1e-4)
    assert c.optim.warmup_epochs == 2.0 and _cfg("finetune", "model=nextvit_s_hal,init=x").optim.warmup_epochs == 3.0
    d = _cfg("finetune", "model=demo")
    assert (d.model_name, d.init_from, d.total_epochs, d.optim.lr) == ("deit_tiny_hal", "runs/demo_hal_converted", 10.0, 5e-4)
    with pytest.raises(ValueError, match="needs init="):
        _cfg("finetune", "model=deit_t_hal")
    with pytest.raises(ValueError, match="Unknown model="):
        _cfg("finetune", "model=resnet")


@pytest.mark.parametrize("preset", ["deit_t_hal", "pvt_v2_b1_hal", "nextvit_s_hal"])
def test_every_ablation_is_a_hal_config_change_that_builds_on_every_family(preset):
    for name, change in ABLATIONS.items():
        c = ablate(_cfg(preset, "runlocal,data=demo"), name)
        model = hv.create_model(c.model_name, num_classes=10, **c.model)
        expected = None if change is None else hv.HalConfig(**change)
        assert model.hal == expected, (preset, name)
    with pytest.raises(ValueError, match="Ablations start from a hal config"):
        ablate(_cfg("deit_t"), "chh")


def test_load_config_path_with_argument():
    assert load_config(os.path.join(CONFIGS, "demo.py:ci")).total_epochs == 10.0


def test_fields_a_config_sets_to_none_stay_overridable_from_the_command_line():
    c = _cfg("demo")  # checkpoint_every_steps=None: it saves by epochs
    assert c.checkpoint_every_steps is None
    # --config.checkpoint_every_steps=3 needs a typed field (a None-typed one is refused).
    assert c.get_type("checkpoint_every_steps") is int
    assert ch.base_config().checkpoint_every_steps == 1000
