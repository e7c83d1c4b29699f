"""Trainer test helpers (imported by the other test_train_* modules) and unit tests of the pure
pieces: learning-rate schedule, weight-decay mask, sharding rules, config presets."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

# A DeiT-hal small enough for a step in milliseconds: 4x4 patch grid, 2 blocks of width 32.
TINY_MODEL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0)
TINY_CLI = [f"--config.model.{k}={v}" for k, v in TINY_MODEL.items()]


def load_config(name: str, arg: str | None = None):
    from halluvit_jax.cli import load_config as load

    return load(os.path.join(CONFIGS, f"{name}.py"), arg)


def tiny_demo_config(data_dir: str, **fields):
    """configs/demo.py with the tiny model, batch 16, small steps; ``fields`` override (dotted ok)."""
    from halluvit_jax.config_helpers import runlocal

    c = runlocal(load_config("demo", f"data_dir={data_dir}"), **TINY_MODEL)  # batch 16, 2 threads
    c.total_steps = 6
    c.log_every_steps = 1
    c.eval_every_steps = None
    c.checkpoint_every_steps = 3
    c.tensorboard = False
    for key, value in fields.items():
        node = c
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return c


# Subprocesses share a persistent XLA compilation cache: a resumed run, or a test re-run, then
# skips the ~20 s of compiling on 2 cores. Caching never changes results.
JAX_CACHE_DIR = os.path.join(tempfile.gettempdir(), f"halluvit_jax_test_cache_{os.getuid()}")


def subprocess_env(num_devices: int = 2) -> dict[str, str]:
    env = dict(os.environ)
    # The test session's XLA flags (tests/conftest.py) with this process's device count.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={num_devices}", *flags])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = JAX_CACHE_DIR
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def train_cmd(data_dir: str, workdir: str, *extra: str) -> list[str]:
    """The README's command line (`python train.py --config configs/demo.py ...`) with the tiny model."""
    return [
        sys.executable, os.path.join(REPO, "train.py"),
        f"--config={os.path.join(CONFIGS, 'demo.py')}:data_dir={data_dir}", f"--workdir={workdir}",
        "--config.global_batch_size=16", "--config.total_steps=12", "--config.optim.warmup_steps=2",
        "--config.log_every_steps=1", "--config.checkpoint_every_steps=3",
        "--config.input.num_threads=2", "--config.tensorboard=False", "--config.eval_every_steps=-1",
        *TINY_CLI, *extra,
    ]


def run_train(data_dir: str, workdir: str, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(data_dir, workdir, *extra), env=subprocess_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_losses(workdir: str) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}


def final_state(workdir: str):
    from halluvit_jax.checkpoint import read_checkpoint

    ckpt = read_checkpoint(workdir)
    return ckpt.step, ckpt.state


def assert_trees_bitwise_equal(a, b):
    la, _ = jax.tree_util.tree_flatten_with_path(a)
    lb, _ = jax.tree_util.tree_flatten_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert x.tobytes() == y.tobytes(), f"{jax.tree_util.keystr(path)} differs"


# ---------------------------------------------------------------------------------------------
# Unit tests.


def test_learning_rate_schedule_matches_hand_formula():
    from halluvit_jax.train.optim import create_learning_rate_fn

    base, total, warm, init, low = 1e-3, 100, 10, 1e-6, 1e-5
    fn = create_learning_rate_fn(base_lr=base, total_steps=total, warmup_steps=warm,
                                 warmup_init_lr=init, min_lr=low)
    for step in (0, 5, 10, 37, 99, 100):
        if step < warm:
            want = init + (base - init) * step / warm
        else:
            t = (step - warm) / (total - warm)
            want = low + (base - low) * 0.5 * (1 + math.cos(math.pi * t))
        assert float(fn(step)) == pytest.approx(want, rel=1e-5), step


def test_weight_decay_mask_excludes_norms_biases_pos_embed_cls_token():
    from halluvit_jax.config_helpers import NO_DECAY_REGEX
    from halluvit_jax.train.optim import weight_decay_mask

    params = {
        "pos_embed": jnp.zeros((1, 5, 4)), "cls_token": jnp.zeros((1, 1, 4)),
        "patch_embed": {"kernel": jnp.zeros((2, 2, 3, 4)), "bias": jnp.zeros(4)},
        "blocks_0": {"norm1": {"scale": jnp.zeros(4), "bias": jnp.zeros(4)},
                     "attn": {"qkv": {"kernel": jnp.zeros((4, 12))}, "ihh_kernel": jnp.zeros((2, 3, 3)),
                              "chh_bias": jnp.zeros(2)},
                     "mlp": {"fc2a": {"branch_kernel": jnp.zeros((2, 8, 3)),
                                      "bn": {"scale": jnp.zeros((2, 3)), "bias": jnp.zeros((2, 3))}}}},
    }
    mask = weight_decay_mask(params, NO_DECAY_REGEX)
    assert mask["pos_embed"] is False and mask["cls_token"] is False
    assert mask["patch_embed"] == {"kernel": True, "bias": False}
    assert mask["blocks_0"]["norm1"] == {"scale": False, "bias": False}
    assert mask["blocks_0"]["attn"] == {"qkv": {"kernel": True}, "ihh_kernel": True, "chh_bias": False}
    # cFFN BatchNorm affine parameters are 2-d ([branches, C]) but are norm parameters: no decay.
    assert mask["blocks_0"]["mlp"]["fc2a"] == {"branch_kernel": True, "bn": {"scale": False, "bias": False}}


@pytest.mark.parametrize("name", ["deit_t", "deit_t_hal", "deit_s", "deit_s_hal", "pvt_v2_b1",
                                  "pvt_v2_b1_hal", "nextvit_s", "nextvit_s_hal"])
def test_presets_state_their_paper_recipe(name):
    import halluvit_jax as hv

    c = load_config(name)
    assert c.model_name in hv.list_models(), c.model_name
    assert c.total_epochs == 300 and c.optim.name == "adamw" and c.optim.schedule == "cosine"
    family = name.split("_")[0]
    lr = c.optim.lr * c.global_batch_size / c.optim.lr_base_batch_size
    if family in ("deit", "pvt"):
        assert (c.global_batch_size, lr, c.optim.weight_decay, c.optim.warmup_epochs) == (1024, 1e-3, 0.05, 5)
    else:  # Next-ViT
        assert (c.global_batch_size, lr, c.optim.weight_decay, c.optim.warmup_epochs) == (2048, 2e-3, 0.1, 20)
    assert c.model.drop_path_rate == 0.1 and c.input.label_smoothing == 0.1
    assert (c.input.mixup, c.input.cutmix) == (0.8, 1.0)
    small = load_config(name, "runlocal,data=demo")
    assert small.total_steps == 10 and small.input.dataset == "halluvit_digits"
    with pytest.raises(ValueError, match="Unknown config argument"):
        load_config(name, "runlocl")


def test_init_from_merge_resamples_pos_embed_and_keeps_a_new_head():
    from halluvit_jax.models.deit import resample_pos_embed
    from halluvit_jax.train.checkpointing import merge_pretrained

    rng = np.random.default_rng(0)
    init = {"params": {"pos_embed": np.zeros((1, 1 + 16, 8), np.float32),
                       "blocks_0": {"fc": {"kernel": np.zeros((8, 8), np.float32)}},
                       "head": {"kernel": np.zeros((8, 10), np.float32), "bias": np.zeros(10, np.float32)}},
            "batch_stats": {"bn": {"mean": np.zeros(3, np.float32)}}}
    loaded = {"params": {"pos_embed": rng.normal(size=(1, 1 + 64, 8)).astype(np.float32),
                         "blocks_0": {"fc": {"kernel": rng.normal(size=(8, 8)).astype(np.float32)}},
                         "head": {"kernel": rng.normal(size=(8, 1000)).astype(np.float32),
                                  "bias": rng.normal(size=1000).astype(np.float32)}},
              "batch_stats": {"bn": {"mean": np.ones(3, np.float32)}}}
    out = merge_pretrained(init, loaded)
    # 8x8 grid -> 4x4 grid, class token kept (timm's bicubic + antialias resampling).
    np.testing.assert_array_equal(out["params"]["pos_embed"],
                                  resample_pos_embed(loaded["params"]["pos_embed"], (4, 4)))
    np.testing.assert_array_equal(out["params"]["pos_embed"][:, :1], loaded["params"]["pos_embed"][:, :1])
    np.testing.assert_array_equal(out["params"]["blocks_0"]["fc"]["kernel"], loaded["params"]["blocks_0"]["fc"]["kernel"])
    assert not out["params"]["head"]["kernel"].any() and not out["params"]["head"]["bias"].any()  # 10 != 1000 classes
    np.testing.assert_array_equal(out["batch_stats"]["bn"]["mean"], np.ones(3))
    again = merge_pretrained(init, loaded, reinit_regex=r"^blocks_0/")
    assert not again["params"]["blocks_0"]["fc"]["kernel"].any()


def test_uint8_batches_are_normalized_on_device_like_the_host_op():
    """`normalize(on_device=1)` ships uint8; train targets_fn and eval_step normalize them with
    the config's mean/std exactly as the host op `normalize` would (hand formula)."""
    import ml_collections

    from halluvit_jax.models import create_model
    from halluvit_jax.train import steps

    cfg = ml_collections.ConfigDict({"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)})
    img = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    host = (img / 255.0 - np.array(cfg.mean)) / np.array(cfg.std)
    out, targets = steps.make_targets_fn(cfg, 10)(jax.random.key(0), jnp.asarray(img), jnp.array([1, 2]))
    np.testing.assert_allclose(np.asarray(out), host, atol=1e-5)
    assert targets.shape == (2, 10)

    model = create_model("deit_tiny", img_size=32, patch_size=8, depth=1, num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    batch = {"label": jnp.array([1, 2])}
    a = steps.eval_step(variables["params"], {}, {**batch, "image": jnp.asarray(img)},
                          apply_fn=model.apply, mean_std=steps.mean_std_of(cfg))
    b = steps.eval_step(variables["params"], {}, {**batch, "image": jnp.asarray(host, jnp.float32)},
                          apply_fn=model.apply)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)
