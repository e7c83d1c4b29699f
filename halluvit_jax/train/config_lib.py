"""Shared pieces of the configs in ``configs/`` (Python files with ``get_config(arg)``).

``--config configs/deit_s_hal.py:runlocal,data=demo`` passes the string after ':' to
``get_config``; :func:`parse_arg` turns it into typed fields (big_vision style).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
from ml_collections import config_dict

from halluvit_jax.data.config import default_input_config, demo_input_config
from halluvit_jax.train.optim import DEFAULT_NO_DECAY_REGEX as NO_DECAY_REGEX


def default_data_dir() -> str:
    """Where datasets are prepared and read unless ``input.data_dir`` says otherwise:
    ``$HALLUVIT_DATA_DIR``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    return os.environ.get("HALLUVIT_DATA_DIR") or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
        "~/tensorflow_datasets")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """'runlocal,data=demo,depth=4' -> ConfigDict; bare names mean True, types follow defaults."""
    out = ml_collections.ConfigDict(dict(defaults))
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            out[key] = True
            continue
        default = defaults.get(key)
        if isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            out[key] = int(value)
        elif isinstance(default, float):
            out[key] = float(value)
        else:
            out[key] = value
    unknown = set(out.keys()) - set(defaults)
    if unknown:
        raise ValueError(f"Unknown config argument(s) {sorted(unknown)}; known: {sorted(defaults)}.")
    return out


def base_config() -> ml_collections.ConfigDict:
    """Fields shared by every preset, with DeiT's ImageNet recipe as the default."""
    c = ml_collections.ConfigDict()
    c.model_name = "deit_small_hal"
    # Overrides passed to halluvit_jax.create_model (num_classes and dtype are set by the trainer).
    c.model = ml_collections.ConfigDict({"drop_path_rate": 0.1})
    c.input = default_input_config()
    c.prepare_demo = False  # prepare the embedded digits into input.data_dir when missing

    # Durations: `<name>_steps` or `<name>_epochs` (steps win when both are set).
    c.global_batch_size = 1024
    c.total_epochs = config_dict.placeholder(float)
    c.total_steps = config_dict.placeholder(int)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 5e-4  # at lr_base_batch_size; scaled linearly with the global batch
    c.optim.lr_base_batch_size = 512
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.05
    c.optim.no_decay_regex = NO_DECAY_REGEX
    c.optim.grad_clip_norm = config_dict.placeholder(float)  # e.g. 1.0; None: no clipping
    c.optim.schedule = "cosine"
    c.optim.warmup_epochs = config_dict.placeholder(float)
    c.optim.warmup_steps = config_dict.placeholder(int)
    c.optim.warmup_init_lr = 1e-6
    c.optim.min_lr = 1e-5
    c.optim.grad_accum_steps = 1

    c.ema_decay = 0.0  # > 0 keeps an EMA of the weights (evaluated as eval/ema_*)
    c.compute_dtype = "float32"  # or 'bfloat16' (parameters stay float32)

    # Mesh over all devices: ('data', 'fsdp', 'model'); one axis may be -1.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1, "num_devices": -1})
    c.sharding_rules = ()  # extra (regex, spec) pairs, e.g. (('pos_embed', 'replicate'),)
    c.fsdp_min_size = 2**14
    c.distributed = False  # call jax.distributed.initialize() (multi-host TPU/GPU)

    c.seed = 0
    c.log_every_steps = 100
    c.eval_every_epochs = config_dict.placeholder(float)
    c.eval_every_steps = config_dict.placeholder(int)
    c.checkpoint_every_steps = config_dict.placeholder(int)
    c.checkpoint_every_steps = 1000
    c.checkpoint_every_epochs = config_dict.placeholder(float)
    c.keep_checkpoints = 3
    c.keep_every_epochs = config_dict.placeholder(float)  # periodic snapshots kept forever
    c.keep_every_steps = config_dict.placeholder(int)
    c.async_checkpointing = True
    c.tensorboard = True

    # Fine-tune / transfer: a converted checkpoint dir (model_card.json) or a training workdir.
    c.init_from = ""
    c.init_reinit_regex = ""  # params matching it keep their fresh init (e.g. '^head/')
    return c


def deit_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """DeiT (Touvron et al. 2021, Table 9): 300 epochs, batch 1024, AdamW lr 5e-4 x batch/512,
    wd 0.05, cosine to 1e-5, 5 warm-up epochs from 1e-6, label smoothing 0.1, drop-path 0.1,
    RandAugment rand-m9-mstd0.5-inc1, Mixup 0.8 / CutMix 1.0 (switch 0.5), random erasing 0.25,
    repeated augmentation x3, no gradient clipping, no EMA in the reported numbers."""
    c.global_batch_size = 1024
    c.total_epochs = 300.0
    c.optim.lr = 5e-4
    c.optim.lr_base_batch_size = 512
    c.optim.weight_decay = 0.05
    c.optim.warmup_epochs = 5.0
    c.optim.warmup_init_lr = 1e-6
    c.optim.min_lr = 1e-5
    c.model.drop_path_rate = 0.1
    c.input.crop_pct = 0.875
    c.input.randaugment = "rand-m9-mstd0.5-inc1"
    c.input.random_erase = 0.25
    c.input.mixup = 0.8
    c.input.cutmix = 1.0
    c.input.mixup_switch_prob = 0.5
    c.input.label_smoothing = 0.1
    c.input.repeated_aug = 3
    c.eval_every_epochs = 5.0
    c.checkpoint_every_steps = 1000
    c.keep_every_epochs = 50.0
    return c


def apply_common_args(c: ml_collections.ConfigDict, arg: ml_collections.ConfigDict,
                      runlocal_model: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
    """`data=demo` swaps in the embedded digits dataset; `runlocal` shrinks everything for a
    smoke run of a few seconds to minutes on a laptop CPU (model, batch, steps, threads)."""
    if arg.get("data", "") == "demo":
        c.input = demo_input_config(c.input.get("data_dir") or default_data_dir())
        c.prepare_demo = True
        if c.model_name.startswith("deit"):
            c.model.img_size = c.input.image_size  # DeiT is built for one resolution
        else:
            c.input.image_size = 64  # stride-32 pyramids: keep a 2x2 last stage
    elif arg.get("data", ""):
        raise ValueError(f"Unknown data={arg.data!r}; use data=demo or leave it out.")
    if arg.get("runlocal", False):
        c.global_batch_size = 16
        c.total_epochs = None
        c.total_steps = 10
        c.optim.warmup_epochs = None
        c.optim.warmup_steps = 2
        c.log_every_steps = 2
        c.eval_every_epochs = None
        c.eval_every_steps = 10
        c.checkpoint_every_steps = 5
        c.keep_every_epochs = None
        c.input.num_threads = 2
        c.input.prefetch_buffer_size = 8
        c.input.repeated_aug = 0
        if c.input.dataset != "halluvit_digits":  # clamped to smaller prepared splits (trainer.fit_splits)
            c.input.train_split = "train[:256]"
            c.input.eval_split = "validation[:64]"
        for k, v in (runlocal_model or {}).items():
            c.model[k] = v
    return c


def preset(model_name: str, arg: str | None, *, recipe, runlocal_model: dict[str, Any]) -> ml_collections.ConfigDict:
    """A paper preset: ``recipe(base_config())`` with ``model_name`` and the common arguments."""
    a = parse_arg(arg, runlocal=False, data="")
    c = recipe(base_config())
    c.model_name = model_name
    return apply_common_args(c, a, runlocal_model)


def pvt_v2_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """PVTv2 (Wang et al. 2022, sec. 4.1; the PVT repository's DeiT-derived main.py): 300 epochs,
    8 GPUs x 128 = batch 1024, AdamW lr 5e-4 x batch/512 (= 1e-3), wd 0.05, cosine to 1e-5 after
    5 warm-up epochs, drop-path 0.1 for b1, no gradient clipping, DeiT augmentations."""
    c = deit_recipe(c)
    c.model.drop_path_rate = 0.1
    return c


def nextvit_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Next-ViT (Li et al. 2022, sec. 4.1): 300 epochs, batch 2048, AdamW lr 5e-4 x batch/512
    (= 2e-3), weight decay 0.1, cosine, 20 warm-up epochs, drop-path 0.1 for Next-ViT-S, label
    smoothing 0.1, DeiT augmentations (RandAugment, Mixup/CutMix, random erasing)."""
    c = deit_recipe(c)
    c.global_batch_size = 2048
    c.optim.weight_decay = 0.1
    c.optim.warmup_epochs = 20.0
    c.model.drop_path_rate = 0.1
    c.input.repeated_aug = 0
    return c
