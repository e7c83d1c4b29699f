"""The classification trainer: ``train_and_evaluate(config, workdir)``.

One readable function split by banner comments (big_vision style), around flat pure functions:
:func:`create_model`, :func:`cross_entropy`, :func:`train_step`, :func:`eval_step`,
:func:`create_train_state`. Everything is ``jax.jit`` with explicit shardings over a
('data', 'fsdp', 'model') mesh; the same code runs on one CPU and on a multi-host TPU pod.

Determinism: the per-step RNG is ``fold_in(seed_rng, step)``, the input iterator state is
checkpointed with the train state, so a resumed run is bitwise identical to an uninterrupted one
on the same devices.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from halluvit_jax.cli import Interrupted, UserError, clause
from halluvit_jax.data import demo, pipeline, registry, tfds_utils
from halluvit_jax.data import mixup as mixup_lib
from halluvit_jax.data.ops import normalize_on_device
from halluvit_jax.models import create_model as build_model
from halluvit_jax.train import checkpointing, optim, sharding
from halluvit_jax.train.metrics import MetricWriter, Progress

logger = logging.getLogger("halluvit_jax.train")


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. ``ema_params`` is an empty dict when EMA is off."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any


# ---------------------------------------------------------------------------------------------
# Pure functions.


def compute_dtype(config: ml_collections.ConfigDict):
    name = config.get("compute_dtype", "float32")
    if name in ("float32", None):
        return None
    if name == "bfloat16":
        return jnp.bfloat16
    if name == "float16":
        return jnp.float16
    raise UserError(f"unknown compute_dtype {name!r}; use 'float32', 'bfloat16' or 'float16'")


def create_model(config: ml_collections.ConfigDict, num_classes: int, **extra: Any) -> nn.Module:
    """The registered model ``config.model_name`` with ``config.model`` overrides (float32 params)."""
    overrides = dict(config.get("model", {}) or {})
    overrides.update(num_classes=num_classes, dtype=compute_dtype(config), param_dtype=jnp.float32)
    overrides.update(extra)
    return build_model(config.model_name, **overrides)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Soft-target cross entropy per example (targets: mixed / smoothed one-hot), in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(targets * logp, axis=-1)


def mean_std_of(input_config: ml_collections.ConfigDict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return tuple(input_config.get("mean", (0.0, 0.0, 0.0))), tuple(input_config.get("std", (1.0, 1.0, 1.0)))


def maybe_normalize(images: jax.Array, mean_std: tuple | None) -> jax.Array:
    """Normalize uint8 batches (op ``normalize(on_device=1)``) on the device; floats pass through."""
    if mean_std is None or images.dtype != jnp.uint8:
        return images
    return normalize_on_device(images, *mean_std)


def make_targets_fn(input_config: ml_collections.ConfigDict, num_classes: int) -> Callable:
    """``fn(rng, images, labels) -> (images, soft_targets)``: Mixup/CutMix + label smoothing.

    uint8 images (host op ``normalize(on_device=1)``) are normalized here first, on the device.
    """
    fn = _make_targets_fn(input_config, num_classes)
    mean_std = mean_std_of(input_config)

    def targets_fn(rng, images, labels):
        return fn(rng, maybe_normalize(images, mean_std), labels)

    return targets_fn


def _make_targets_fn(input_config: ml_collections.ConfigDict, num_classes: int) -> Callable:
    mixup_alpha = float(input_config.get("mixup", 0.0) or 0.0)
    cutmix_alpha = float(input_config.get("cutmix", 0.0) or 0.0)
    smoothing = float(input_config.get("label_smoothing", 0.0) or 0.0)
    prob = float(input_config.get("mixup_prob", 1.0))
    if mixup_alpha <= 0 and cutmix_alpha <= 0 or prob <= 0:
        def targets_fn(rng, images, labels):
            del rng  # timm's label smoothing: off-value s/K, on-value 1 - s + s/K.
            one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
            return images, one_hot * (1.0 - smoothing) + smoothing / num_classes
    else:
        def targets_fn(rng, images, labels):
            return mixup_lib.mixup_cutmix(
                rng, images, labels, num_classes=num_classes, mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha, switch_prob=float(input_config.get("mixup_switch_prob", 0.5)),
                label_smoothing=smoothing, prob=prob,
            )
    return targets_fn


def create_train_state(
    rng: jax.Array, *, model: nn.Module, tx: optax.GradientTransformation, image_size: int, use_ema: bool
) -> TrainState:
    """Fresh parameters (timm init), optimizer state and, optionally, an EMA copy."""
    variables = model.init(
        {"params": rng, "dropout": rng}, jnp.zeros((2, image_size, image_size, 3), jnp.float32), train=False
    )
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        ema_params=jax.tree_util.tree_map(jnp.copy, params) if use_ema else {},
    )


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    apply_fn: Callable,
    tx: optax.GradientTransformation,
    targets_fn: Callable,
    learning_rate_fn: optax.Schedule,
    grad_accum_steps: int = 1,
    ema_decay: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch (optionally as ``grad_accum_steps`` micro-batches).

    BatchNorm statistics (cFFN, NextViT) are computed over the whole (micro-)batch across all
    devices: under ``jax.jit`` with a sharded batch, the mean over the batch axis is global.
    """
    step_rng = jax.random.fold_in(rng, state.step)
    mix_rng, drop_rng = jax.random.split(step_rng)
    images, targets = targets_fn(mix_rng, batch["image"], batch["label"])

    def loss_fn(params, batch_stats, images, targets, dropout_rng):
        logits, new_vars = apply_fn(
            {"params": params, "batch_stats": batch_stats}, images, train=True,
            mutable=["batch_stats"], rngs={"dropout": dropout_rng},
        )
        loss = jnp.mean(cross_entropy(logits, targets))
        return loss, new_vars.get("batch_stats", {})

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum_steps == 1:
        (loss, batch_stats), grads = grad_fn(state.params, state.batch_stats, images, targets, drop_rng)
    else:
        n = images.shape[0]
        if n % grad_accum_steps:
            raise ValueError(f"Batch {n} is not divisible by grad_accum_steps={grad_accum_steps}.")
        # [B, ...] -> [accum, B/accum, ...] taking every accum-th row, so that each micro-batch
        # keeps the batch sharding (no cross-device reshuffle).
        def split(x):
            x = x.reshape((n // grad_accum_steps, grad_accum_steps) + x.shape[1:])
            return jnp.swapaxes(x, 0, 1)

        micro = (split(images), split(targets))

        def body(carry, xs):
            grads_sum, loss_sum, batch_stats, i = carry
            imgs, tgts = xs
            (loss, batch_stats), grads = grad_fn(
                state.params, batch_stats, imgs, tgts, jax.random.fold_in(drop_rng, i)
            )
            grads_sum = jax.tree_util.tree_map(jnp.add, grads_sum, grads)
            return (grads_sum, loss_sum + loss, batch_stats, i + 1), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        (grads, loss, batch_stats, _), _ = jax.lax.scan(
            body, (zeros, jnp.zeros((), jnp.float32), state.batch_stats, 0), micro
        )
        grads = jax.tree_util.tree_map(lambda g: g / grad_accum_steps, grads)
        loss = loss / grad_accum_steps

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema_decay > 0:
        ema_params = optim.ema_update(ema_params, params, ema_decay)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
        ema_params=ema_params,
    )
    grad_norm = optax.tree.norm(grads)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(params),
        "lr": learning_rate_fn(state.step),
        # Everything a checkpoint of this step would hold, in one fused reduction.
        "finite": checkpointing.all_finite(
            (loss, grad_norm, params, batch_stats, opt_state, ema_params)).astype(jnp.float32),
    }
    return new_state, metrics


def eval_step(params: Any, batch_stats: Any, batch: dict[str, jax.Array], *, apply_fn: Callable,
              mean_std: tuple | None = None) -> dict[str, jax.Array]:
    """Sums of top-1 / top-5 hits, loss and count over the real (mask=1) examples of a batch.

    ``mean_std``: normalization applied on the device to uint8 batches (``normalize(on_device=1)``).
    """
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    logits = apply_fn(variables, maybe_normalize(batch["image"], mean_std), train=False).astype(jnp.float32)
    labels = batch["label"]
    mask = batch.get("mask", jnp.ones_like(labels)).astype(jnp.float32)
    k = min(5, logits.shape[-1])
    topk = jax.lax.top_k(logits, k)[1]
    top1 = (topk[:, 0] == labels).astype(jnp.float32)
    top5 = jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    return {
        "top1": jnp.sum(top1 * mask),
        "top5": jnp.sum(top5 * mask),
        "loss": jnp.sum(nll * mask),
        "count": jnp.sum(mask),
    }


# ---------------------------------------------------------------------------------------------
# Helpers of the loop.


def resolve_steps(config: ml_collections.ConfigDict, name: str, steps_per_epoch: int, default=None):
    """A duration given as ``{name}_steps`` or ``{name}_epochs`` -> steps (steps win if both are set)."""
    steps = config.get(f"{name}_steps")
    epochs = config.get(f"{name}_epochs")
    if steps is not None:  # steps win, so `--config.total_steps=N` overrides a preset's epochs
        return int(steps)
    if epochs is not None:
        return max(int(round(float(epochs) * steps_per_epoch)), 0 if name == "warmup" else 1)
    return default


def _periodic(step: int, every: int | None, total: int) -> bool:
    return bool(every) and every > 0 and (step % every == 0 or step == total)


class _Preemption:
    """SIGTERM and SIGINT (Ctrl-C) set a flag; the loop checkpoints and stops at the next step
    boundary. A second Ctrl-C interrupts at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        del frame
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logger.debug("%s received: saving a checkpoint and stopping at the next step.",
                       signal.Signals(signum).name)
        self.requested = True
        self.signum = signum

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            # All hosts must agree on the step at which they save; JAX's coordination service
            # sees the preemption notice on every host and picks a common step.
            try:
                return self.requested or multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:
                return False
        return self.requested

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


class TrainingDiverged(UserError, FloatingPointError):
    """A step produced a non-finite loss, gradient or state; nothing of it was saved (exit 1)."""


def _check_finite(metrics: dict[str, Any], step: int, manager) -> None:
    """Raises :class:`TrainingDiverged` if step ``step`` made anything that a checkpoint holds
    (loss, gradients, parameters, BatchNorm statistics, optimizer state, EMA) non-finite.

    Called before a step is checkpointed, so a non-finite state is never saved.
    """
    if float(metrics["finite"]) == 1.0:
        return
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    manager.wait_until_finished()
    latest = manager.latest_step()
    where = os.fspath(manager.directory)
    last = (f"the last finite checkpoint is step {latest} ({where}/{latest}), kept as it was"
            if latest is not None else "there is no checkpoint yet")
    what = ("loss" if not math.isfinite(loss) else "gradient" if not math.isfinite(grad_norm)
            else "parameters / BatchNorm statistics / optimizer state")
    raise TrainingDiverged(
        f"Non-finite {what} (loss {loss}, grad norm {grad_norm}) at step {step}; stopped without saving it; "
        f"{last}; lower optim.lr or set optim.grad_clip_norm (e.g. --config.optim.grad_clip_norm=1.0)"
    )


def prepare_data(input_cfg: ml_collections.ConfigDict) -> None:
    """Prepares the embedded digits dataset (process 0; the others wait) if it is missing.

    ``input.data_dir`` None means TFDS's default directory (``$TFDS_DATA_DIR`` or
    ``~/tensorflow_datasets``).
    """
    if input_cfg.dataset != demo.DEMO_DATASET:
        return
    if jax.process_index() == 0:
        data_dir = input_cfg.get("data_dir") or None
        builder = demo.HalluvitDigits(data_dir=data_dir)
        if not builder.is_prepared():
            # TFDS prints "Downloading and preparing dataset Unknown size ..." and "downloaded":
            # nothing is downloaded, so say what happens instead.
            logger.info("Preparing the embedded demo dataset into %s (a few seconds, no download).",
                        builder.data_dir_root)
            builder._log_download_bytes = lambda: None
            builder._log_download_done = lambda: None
            tfds_utils.prepare_builder(builder)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("prepare_demo")


def fit_splits(input_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``input_cfg`` with slices ``split[:N]`` clamped to the prepared split's size (so that
    ``runlocal``'s ``train[:256]`` works on a dataset of 45 images); other splits unchanged."""
    out = None
    for field in ("train_split", "eval_split"):
        split = str(input_cfg.get(field) or "")
        m = re.fullmatch(r"(\w+)\[:(\d+)\]", split)
        if not m:
            continue
        builder = registry.get_builder(input_cfg.dataset, input_cfg.get("data_dir"))
        tfds_utils.check_prepared(builder, m.group(1), input_cfg.dataset)
        n = int(builder.info.splits[m.group(1)].num_examples)
        if int(m.group(2)) > n:
            out = out or ml_collections.ConfigDict(input_cfg.to_dict())
            out[field] = f"{m.group(1)}[:{n}]"
            logger.info("input.%s %s: the prepared split has %d examples; using %s.", field, split, n, out[field])
    return input_cfg if out is None else out


def evaluate_dataset(step_fn: Callable, params: Any, batch_stats: Any, input_cfg: ml_collections.ConfigDict, *,
                     global_batch_size: int, mesh) -> dict[str, float]:
    """Top-1 / top-5 / loss (means over the real examples) and count of ``input_cfg.eval_split``.

    ``step_fn(params, batch_stats, batch)`` is a jitted :func:`eval_step`; the batches are
    sharded over ``mesh``. The one evaluation loop of the trainer and of
    ``python -m halluvit_jax.evaluate``.
    """
    totals = None
    for batch in pipeline.create_eval_iter(input_cfg, global_batch_size=global_batch_size):
        out = step_fn(params, batch_stats, sharding.shard_batch(batch, mesh))
        totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
    if totals is None:
        raise UserError(f"eval split {input_cfg.eval_split!r} of {input_cfg.dataset} is empty; set input.eval_split")
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    return {"top1": float(totals["top1"]) / count, "top5": float(totals["top5"]) / count,
            "loss": float(totals["loss"]) / count, "count": float(totals["count"])}


def _truncate_metrics(workdir: str, step: int) -> None:
    """Drops rows of ``metrics.jsonl`` past ``step`` (written after the checkpoint a run resumes
    from), so that every logged step has exactly one row after any number of resumes."""
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a row cut by a kill
            continue
        if int(row.get("step", 0)) <= step:
            keep.append(json.dumps(row) + "\n")
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# train_and_evaluate.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains ``config.model_name`` on ``config.input``, evaluating and checkpointing into ``workdir``.

    Resumes from the latest checkpoint in ``workdir`` if there is one, else starts from
    ``config.init_from`` (converted or training checkpoint) if set, else from scratch.
    Returns the final train state.
    """
    # ----------------------------------------------------------------------------------------
    # Distributed setup and mesh.
    if config.get("distributed", False) and not jax.distributed.is_initialized():
        jax.distributed.initialize()
    workdir = os.path.abspath(workdir)
    mesh = sharding.create_mesh(config.get("mesh", {}))
    logger.info("Process %d/%d, %d devices, mesh %s.", jax.process_index(), jax.process_count(),
                jax.device_count(), dict(mesh.shape))

    # ----------------------------------------------------------------------------------------
    # Input pipeline.
    input_cfg = config.input
    if config.get("prepare_demo", False):
        prepare_data(input_cfg)
    input_cfg = fit_splits(input_cfg)
    batch_size = int(config.global_batch_size)
    dp = sharding.data_parallel_size(mesh)
    if batch_size % dp or batch_size % jax.process_count():
        raise UserError(
            f"global_batch_size={batch_size} must be divisible by the data-parallel size "
            f"{dp} (mesh data x fsdp) and the process count {jax.process_count()}; change "
            "--config.global_batch_size or --config.mesh"
        )
    num_classes = int(pipeline.num_classes(input_cfg))
    num_train = int(pipeline.num_examples(input_cfg, input_cfg.train_split))
    steps_per_epoch = max(num_train // batch_size, 1)
    total_steps = resolve_steps(config, "total", steps_per_epoch)
    if total_steps is None:
        raise UserError("neither total_steps nor total_epochs is set; pass --config.total_steps=N")
    warmup_steps = resolve_steps(config.optim, "warmup", steps_per_epoch, default=0)
    eval_every = resolve_steps(config, "eval_every", steps_per_epoch)
    ckpt_every = resolve_steps(config, "checkpoint_every", steps_per_epoch)
    keep_every = resolve_steps(config, "keep_every", steps_per_epoch)
    log_every = int(config.get("log_every_steps", 50))
    train_iter = pipeline.create_train_iter(input_cfg, global_batch_size=batch_size, seed=int(config.seed))
    logger.info("%d train examples, %d steps/epoch, %d steps (%.1f epochs), %d classes.",
                num_train, steps_per_epoch, total_steps, total_steps / steps_per_epoch, num_classes)

    # ----------------------------------------------------------------------------------------
    # Model and optimizer.
    try:
        model = create_model(config, num_classes)
    except (ValueError, TypeError) as err:  # an unknown model name or field
        raise UserError(f"cannot build {config.model_name} with config.model {dict(config.get('model') or {})}: "
                        f"{clause(err)}; fix --config.model_name / --config.model.*") from None
    base_lr = float(config.optim.lr) * batch_size / float(config.optim.get("lr_base_batch_size", batch_size) or batch_size)
    learning_rate_fn = optim.create_learning_rate_fn(
        base_lr=base_lr, total_steps=total_steps, warmup_steps=warmup_steps,
        warmup_init_lr=float(config.optim.get("warmup_init_lr", 0.0)),
        min_lr=float(config.optim.get("min_lr", 0.0)), schedule=config.optim.get("schedule", "cosine"),
    )
    tx = optim.create_optimizer(config.optim, learning_rate_fn)
    ema_decay = float(config.get("ema_decay", 0.0) or 0.0)
    init_fn = functools.partial(
        create_train_state, model=model, tx=tx, image_size=int(input_cfg.image_size), use_ema=ema_decay > 0
    )

    # ----------------------------------------------------------------------------------------
    # Sharding: parameters and optimizer state are born sharded.
    rng = jax.random.key(int(config.seed))
    init_rng, train_rng = jax.random.split(rng)
    try:
        abstract_state = jax.eval_shape(init_fn, init_rng)
    except (ValueError, TypeError) as err:  # e.g. odd hMHSA heads, an unknown model field
        raise UserError(f"cannot build {config.model_name} with config.model {dict(config.get('model') or {})}: "
                        f"{clause(err)}; fix --config.model_name / --config.model.*") from None
    rules = [tuple(r) for r in config.get("sharding_rules", ())]
    state_shardings = sharding.infer_shardings(
        abstract_state, mesh, rules=rules, fsdp_min_size=int(config.get("fsdp_min_size", 2**14))
    )
    abstract_state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_shardings
    )
    n_params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract_state.params))
    logger.info("Model %s: %.2fM parameters.", config.model_name, n_params / 1e6)
    table_level = logging.INFO if mesh.devices.size > 1 else logging.DEBUG
    if logger.isEnabledFor(table_level):
        logger.log(table_level, "Largest leaves and their shardings:\n%s",
                   sharding.describe(state_shardings.params, abstract_state.params, max_lines=12))
    repl = sharding.replicated(mesh)
    batch_sh = sharding.batch_sharding(mesh)

    jit_train_step = jax.jit(
        functools.partial(
            train_step, apply_fn=model.apply, tx=tx, targets_fn=make_targets_fn(input_cfg, num_classes),
            learning_rate_fn=learning_rate_fn, grad_accum_steps=int(config.optim.get("grad_accum_steps", 1)),
            ema_decay=ema_decay,
        ),
        in_shardings=(state_shardings, batch_sh, repl),
        out_shardings=(state_shardings, repl),
        donate_argnums=(0,),
    )
    jit_eval_step = jax.jit(
        functools.partial(eval_step, apply_fn=model.apply, mean_std=mean_std_of(input_cfg)),
        in_shardings=(state_shardings.params, state_shardings.batch_stats, batch_sh),
        out_shardings=repl,
    )

    # ----------------------------------------------------------------------------------------
    # Checkpoint: resume from the workdir, else init_from, else from scratch.
    manager = checkpointing.create_checkpoint_manager(
        os.path.join(workdir, "checkpoints"), max_to_keep=int(config.get("keep_checkpoints", 3)),
        keep_period=keep_every, async_save=bool(config.get("async_checkpointing", True)),
    )
    state = checkpointing.restore_latest(manager, abstract_state, train_iter)
    if state is None:
        state = jax.jit(init_fn, out_shardings=state_shardings)(init_rng)
        if config.get("init_from"):
            loaded = checkpointing.load_pretrained_variables(config.init_from)
            fresh = {"params": state.params, "batch_stats": state.batch_stats}
            if jax.process_count() > 1:  # parameters span hosts: gather full copies
                fresh = multihost_utils.process_allgather(fresh, tiled=True)
            fresh = jax.device_get(fresh)
            merged = checkpointing.merge_pretrained(
                fresh, loaded, reinit_regex=config.get("init_reinit_regex") or None, where=config.init_from
            )
            params = jax.device_put(merged["params"], state_shardings.params)
            state = state.replace(
                params=params,
                batch_stats=jax.device_put(merged["batch_stats"], state_shardings.batch_stats),
                opt_state=jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params),
                ema_params=jax.device_put(merged["params"], state_shardings.ema_params) if ema_decay > 0 else {},
            )
            logger.info("Initialized from %s.", config.init_from)
    start_step = int(jax.device_get(state.step))
    save_config(config, workdir)  # after the restore: a config that does not fit never replaces it

    # ----------------------------------------------------------------------------------------
    # Evaluation.
    def evaluate(state: TrainState) -> dict[str, float]:
        results = {}
        variants = [("", state.params)]
        if ema_decay > 0:
            variants.append(("ema_", state.ema_params))
        for prefix, params in variants:
            res = evaluate_dataset(jit_eval_step, params, state.batch_stats, input_cfg,
                                   global_batch_size=batch_size, mesh=mesh)
            results.update({f"eval/{prefix}{k}": res[k] for k in ("top1", "top5", "loss")})
        return results

    # ----------------------------------------------------------------------------------------
    # Train loop.
    final_path = os.path.join(workdir, "final_metrics.json")
    if start_step >= total_steps:
        manager.close()
        final = {}
        if os.path.isfile(final_path):
            with open(final_path) as f:
                final = json.load(f)
        if len(final) <= 1 and os.path.isfile(os.path.join(workdir, "metrics.jsonl")):  # no eval: last train row
            with open(os.path.join(workdir, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f if '"train/loss"' in line]
            final = {k: v for k, v in (rows[-1] if rows else {}).items() if k in ("train/loss", "train/epoch")}
        logger.info("Already finished: the checkpoint in %s is at step %d of %d; nothing to train. Final metrics: %s",
                    workdir, start_step, total_steps,
                    ", ".join(f"{k} {v:.4f}" for k, v in final.items() if k != "step") or "none recorded")
        return state
    _truncate_metrics(workdir, start_step)
    writer = MetricWriter(workdir, tensorboard=bool(config.get("tensorboard", True)))
    if start_step == 0:
        writer.write_text("config", "```\n" + str(config) + "\n```")
    progress = Progress(total_steps, batch_size, start_step)
    preemption = _Preemption()
    train_metrics: list[dict[str, jax.Array]] = []
    pending: tuple[int, dict] | None = None  # (step, metrics) not yet checked for finiteness
    last_eval: dict[str, float] = {}
    step = start_step
    logger.info("Training from step %d to %d.", start_step, total_steps)
    try:
        while step < total_steps:
            batch = sharding.shard_batch(next(train_iter), mesh)
            state, metrics = jit_train_step(state, batch, train_rng)
            step += 1
            if step == start_step + 1:  # compiled: time (and ETA) from here on
                jax.block_until_ready(metrics["loss"])
                progress.start(step)
            train_metrics.append(metrics)
            # Check the previous step's loss while this one runs (no pipeline stall).
            if pending is not None:
                _check_finite(pending[1], pending[0], manager)
            pending = (step, metrics)

            if step % log_every == 0 or step == total_steps:
                _check_finite(pending[1], step, manager)
                pending = None
                host = jax.device_get(train_metrics)
                summary = {f"train/{k}": float(np.mean([m[k] for m in host])) for k in host[0] if k != "finite"}
                train_metrics = []
                line, img_s = progress.line(
                    step, {"loss": summary["train/loss"], "lr": summary["train/lr"]}
                )
                if math.isfinite(img_s):
                    summary["train/images_per_sec"] = img_s
                summary["train/epoch"] = step / steps_per_epoch
                writer.write(step, summary)
                logger.info(line)

            stop = preemption.should_stop(step)
            if _periodic(step, ckpt_every, total_steps) or stop or step == total_steps:
                if pending is not None:
                    _check_finite(pending[1], step, manager)
                    pending = None
                checkpointing.save(manager, step, state, train_iter)
            if _periodic(step, eval_every, total_steps):
                t0 = time.perf_counter()
                last_eval = evaluate(state)
                writer.write(step, last_eval)
                logger.info("step %d eval: %s (%.1fs)", step,
                            ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()), time.perf_counter() - t0)
            if stop:
                logger.warning("Preempted at step %d; checkpoint saved, exiting.", step)
                break
        if pending is not None:
            _check_finite(pending[1], pending[0], manager)
        if step == total_steps and eval_every is None:  # eval_every_steps=-1: never
            last_eval = evaluate(state)
            writer.write(step, last_eval)
            logger.info("final eval: %s", last_eval)
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
        preemption.restore()
    if jax.process_index() == 0 and step == total_steps:
        with open(final_path, "w") as f:
            json.dump({"step": step, **last_eval}, f, indent=2)
    if preemption.signum == signal.SIGINT:
        raise Interrupted("")  # the log line above said it; exit status 130
    return state
