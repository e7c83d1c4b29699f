"""The examples in examples/ run and do what their docstrings claim."""

from __future__ import annotations

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (Linen modules) look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~15 s: trains the example model
def test_own_linen_model_trains_and_folds():
    out = _load("own_linen_model").main(steps=4, depth=1)
    assert out["last_loss"] < out["first_loss"]  # it learns (the same 16 images each step)
    assert out["deploy_rel_diff"] < 1e-5


def test_own_linen_model_uses_hal_layers():
    ex = _load("own_linen_model")
    x = jnp.zeros((1, 16, 16, 3))
    params = jax.eval_shape(ex.TinyHalClassifier().init, jax.random.key(0), x)["params"]
    attn, mlp = params["block0"]["attn"], params["block0"]["mlp"]
    assert attn["qkv"]["kernel"].shape == (32, 2 * 32)  # q', k' of C/2 each + v of C
    assert attn["chh_kernel"].shape == (2, 2) and mlp["fc2a"]["branch_kernel"].shape[0] == 2


@pytest.mark.slow  # ~8 s of compiling; the fast tier checks the Linen example's layers
def test_nnx_bridge_matches_linen_outputs():
    out = _load("nnx_bridge").main()  # compares with Linen's own apply on the same variables
    assert out["max_abs_diff"] < 1e-5 and out["max_abs_diff_features"] < 1e-5
