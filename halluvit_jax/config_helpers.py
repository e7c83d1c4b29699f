"""The small public helper that the config files in ``configs/`` import (big_vision style).

A config file is a Python file with ``get_config(arg)``; ``--config configs/deit_s_hal.py:runlocal,data=demo``
passes the string after ':' as ``arg``. The recipe itself (epochs, batch, optimizer, augmentations,
model) is written out in the config file; this module holds only what every config shares:

- :func:`parse_arg`: ``"runlocal,data=demo,seed=1"`` -> typed fields.
- :func:`base_config`: the fields every config has (plumbing: mesh, checkpoints, logging, EMA,
  ``model.remat``, ``model.impl``), each documented.
- :func:`demo_data` / :func:`runlocal`: the ``data=demo`` and ``runlocal`` arguments every
  preset accepts (a smoke run on the embedded digits).
- :func:`load_config`: another config file by path (configs are files, not a package), e.g. a
  hal preset built as a small change of its baseline.

The paper's ablations (``configs/ablations/``) live in :mod:`halluvit_jax.analysis.ablations`;
whether an ``init=`` checkpoint holds its cFFN folded (``configs/transfer.py``) is
:func:`halluvit_jax.checkpoint.io.cffn_folded`.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
from ml_collections import config_dict

from halluvit_jax.cli import load_config, load_config_module
from halluvit_jax.data.config import default_input_config, demo_input_config
from halluvit_jax.layers.config import NO_DECAY_REGEX, HalConfig

__all__ = ["HalConfig", "NO_DECAY_REGEX", "base_config", "default_data_dir", "default_input_config", "demo_data",
           "demo_input_config", "load_config", "load_config_module", "parse_arg", "preset_arg", "runlocal"]


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
    """The fields every config has, as plumbing: what a recipe leaves unset is a placeholder
    (``None``) that the config file fills in (model, data, batch, schedule, optimizer values:
    see configs/deit_s.py and configs/demo.py) or a switch that is off."""
    c = ml_collections.ConfigDict()
    c.model_name = config_dict.placeholder(str)  # a registered name (halluvit_jax.list_models())
    # Overrides passed to halluvit_jax.create_model (num_classes and dtype are set by the trainer).
    c.model = ml_collections.ConfigDict()
    # Rematerialization of each block in the backward pass: "none" (keep what autodiff saves),
    # "block" (keep only block inputs), or a jax.checkpoint_policies name such as
    # "dots_with_no_batch_dims_saveable" (keep the weight matmuls' outputs). Trades compute for
    # memory; never changes results.
    c.model.remat = "none"
    # How layers compute, never what: "auto" (CPU kernels on CPU, plain jax ops elsewhere),
    # "plain" or "fused" (halluvit_jax.layers.config).
    c.model.impl = "auto"
    c.input = ml_collections.ConfigDict()  # the recipe's: default_input_config() or demo_input_config()
    c.prepare_demo = False  # prepare the embedded digits into input.data_dir when missing

    # Durations: `<name>_steps` or `<name>_epochs` (steps win when both are set).
    c.global_batch_size = config_dict.placeholder(int)
    c.total_epochs = config_dict.placeholder(float)
    c.total_steps = config_dict.placeholder(int)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = config_dict.placeholder(str)  # 'adamw' | 'sgd' (halluvit_jax.train.optim)
    c.optim.lr = config_dict.placeholder(float)  # at lr_base_batch_size; scaled linearly with the global batch
    c.optim.lr_base_batch_size = config_dict.placeholder(int)
    c.optim.weight_decay = config_dict.placeholder(float)
    c.optim.no_decay_regex = NO_DECAY_REGEX  # the trainer's: no decay on biases, norms, embeddings
    c.optim.grad_clip_norm = config_dict.placeholder(float)  # e.g. 1.0; None: no clipping
    c.optim.schedule = config_dict.placeholder(str)  # 'cosine' | 'linear' | 'constant'
    c.optim.warmup_epochs = config_dict.placeholder(float)
    c.optim.warmup_steps = config_dict.placeholder(int)
    c.optim.warmup_init_lr = config_dict.placeholder(float)
    c.optim.min_lr = config_dict.placeholder(float)
    c.optim.grad_accum_steps = 1

    c.ema_decay = 0.0  # > 0 keeps an EMA of the weights (evaluated as eval/ema_*)
    c.compute_dtype = "float32"  # or 'bfloat16' (parameters stay float32)

    # Mesh over all devices: ('data', 'fsdp', 'model'); one axis may be -1. partitioner: 'auto'
    # (GSPMD where fsdp and model are both > 1, JAX's default elsewhere), 'shardy' or 'gspmd'.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1, "num_devices": -1,
                                        "partitioner": "auto"})
    c.sharding_rules = ()  # extra (regex, spec) pairs, e.g. (('pos_embed', 'replicate'),)
    c.fsdp_min_size = 2**14
    c.distributed = False  # call jax.distributed.initialize() (multi-host TPU/GPU)

    c.seed = 0
    c.log_every_steps = 100
    c.eval_every_epochs = config_dict.placeholder(float)
    c.eval_every_steps = config_dict.placeholder(int)
    # Typed int with a value: a config may set None (save by epochs) and the command line an int.
    c.checkpoint_every_steps = ml_collections.FieldReference(1000, field_type=int)
    c.checkpoint_every_epochs = config_dict.placeholder(float)
    c.keep_checkpoints = 3
    c.keep_every_epochs = config_dict.placeholder(float)  # periodic snapshots kept forever
    c.keep_every_steps = config_dict.placeholder(int)
    c.async_checkpointing = True
    c.tensorboard = True

    # Fine-tune / transfer: a converted checkpoint dir (model_card.json) or a training workdir.
    c.init_from = ""
    c.init_reinit_regex = ""  # params matching it keep their fresh init ('^head/': a zero head)
    return c


def demo_data(c: ml_collections.ConfigDict, data: str = "demo", data_dir: str = "") -> ml_collections.ConfigDict:
    """``data=demo``: the embedded digits (32x32, prepared into ``data_dir`` on first use)
    instead of the config's dataset. The config adapts its model to the resolution. Any other
    ``data`` is an error."""
    if data != "demo":
        raise ValueError(f"Unknown data={data!r}; use data=demo or leave it out.")
    c.input = demo_input_config(data_dir or c.input.get("data_dir") or default_data_dir())
    c.prepare_demo = True
    return c


def preset_arg(a: ml_collections.ConfigDict) -> str | None:
    """The ``runlocal`` / ``data`` / ``data_dir`` arguments of ``a`` as a preset's argument string
    (for a config built on a preset with :func:`load_config`)."""
    parts = ["runlocal" if a.get("runlocal") else "", f"data={a.data}" if a.get("data") else "",
             f"data_dir={a.data_dir}" if a.get("data_dir") else ""]
    return ",".join(p for p in parts if p) or None


def runlocal(c: ml_collections.ConfigDict, **model: Any) -> ml_collections.ConfigDict:
    """``runlocal``: a smoke run of seconds to minutes on a laptop CPU: batch 16, 10 steps,
    a few threads, small splits, and ``model`` overrides (e.g. ``depth=2``)."""
    c.global_batch_size = 16
    c.total_epochs = None
    c.total_steps = 10
    c.optim.warmup_epochs = None
    c.optim.warmup_steps = 2
    c.log_every_steps = 2
    c.eval_every_epochs = None
    c.eval_every_steps = 10
    c.checkpoint_every_epochs = None
    c.checkpoint_every_steps = 5
    c.keep_every_epochs = None
    c.input.num_threads = 2
    c.input.prefetch_buffer_size = 8
    c.input.repeated_aug = 0
    if c.input.dataset != "halluvit_digits":  # clamped to smaller prepared splits (trainer.fit_splits)
        c.input.train_split = f"{c.input.train_split.split('[')[0]}[:256]"
        c.input.eval_split = f"{c.input.eval_split.split('[')[0]}[:64]"
    c.model.update(model)
    return c
