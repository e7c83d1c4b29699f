"""The pure pieces of training: the train state, the model of a config, the loss and its
targets (Mixup/CutMix, label smoothing), gradient accumulation, and the jit-able
:func:`train_step` and :func:`eval_step`.

Nothing here touches files, the mesh or the clock; ``trainer.py`` composes these under
``jax.jit`` with explicit shardings (and so do ``evaluate.py`` and the benchmarks). The per-step
RNG is ``fold_in(rng, state.step)``, so a resumed run is bitwise the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from halluvit_jax.checkpoint.trees import all_finite
from halluvit_jax.cli import UserError
from halluvit_jax.data import mixup as mixup_lib
from halluvit_jax.data.ops import normalize_on_device
from halluvit_jax.models import create_model as build_model
from halluvit_jax.train import optim


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. ``ema_params`` is an empty dict when EMA is off."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any


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


def accumulate_gradients(grad_fn: Callable, params: Any, batch_stats: Any, images: jax.Array,
                         targets: jax.Array, rng: jax.Array, steps: int) -> tuple[tuple[jax.Array, Any], Any]:
    """``((loss, batch_stats), grads)`` of ``grad_fn`` over a batch, as ``steps`` micro-batches.

    ``grad_fn(params, batch_stats, images, targets, dropout_rng)`` is a ``value_and_grad`` with
    the new BatchNorm statistics as aux. The loss and gradients are the means over micro-batches;
    the statistics are threaded through them in order; micro-batch ``i`` drops out with
    ``fold_in(rng, i)``. With ``steps == 1`` it is ``grad_fn`` on the whole batch.
    """
    if steps == 1:
        return grad_fn(params, batch_stats, images, targets, rng)
    n = images.shape[0]
    if n % steps:
        raise ValueError(f"Batch {n} is not divisible by grad_accum_steps={steps}.")

    # [B, ...] -> [steps, B/steps, ...] taking every steps-th row, so that each micro-batch
    # keeps the batch sharding (no cross-device reshuffle).
    def split(x):
        x = x.reshape((n // steps, steps) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    def body(carry, xs):
        grads_sum, loss_sum, batch_stats, i = carry
        imgs, tgts = xs
        (loss, batch_stats), grads = grad_fn(params, batch_stats, imgs, tgts, jax.random.fold_in(rng, i))
        grads_sum = jax.tree_util.tree_map(jnp.add, grads_sum, grads)
        return (grads_sum, loss_sum + loss, batch_stats, i + 1), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    (grads, loss, batch_stats, _), _ = jax.lax.scan(
        body, (zeros, jnp.zeros((), jnp.float32), batch_stats, 0), (split(images), split(targets)))
    return (loss / steps, batch_stats), jax.tree_util.tree_map(lambda g: g / steps, grads)


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

    (loss, batch_stats), grads = accumulate_gradients(
        jax.value_and_grad(loss_fn, has_aux=True), state.params, state.batch_stats, images, targets, drop_rng,
        grad_accum_steps)
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
    param_norm = optax.tree.norm(params)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": param_norm,
        "lr": learning_rate_fn(state.step),
        "finite": step_finite(loss, grad_norm, param_norm, new_state, check_ema=ema_decay > 0).astype(jnp.float32),
    }
    return new_state, metrics


def step_finite(loss: jax.Array, grad_norm: jax.Array, param_norm: jax.Array, state: TrainState, *,
                check_ema: bool) -> jax.Array:
    """Whether everything a checkpoint of this step would hold is finite, from the reductions the
    step already computes rather than one reduction per state leaf (on TPU each leaf's reduction
    is a kernel of its own; docs/aot.md measures what they cost).

    - the loss, and ``grad_norm``: a non-finite gradient element makes the norm non-finite;
    - ``param_norm`` of the *updated* parameters: a non-finite parameter, learning rate or
      optimizer update reaches them (a NaN Adam moment, an infinite first moment or momentum
      trace; an infinite second moment alone only zeroes its update);
    - the BatchNorm statistics (few leaves), checked leaf by leaf;
    - the EMA (``check_ema``: when it is kept), by its norm: it is an average of the parameters,
      so it stays finite from a finite start, but one non-finite value would stay in it.

    The optimizer state needs no reduction of its own: its moments are averages of gradients
    (and their squares) whose norm was finite, and a checkpoint with a non-finite moment is
    refused on restore. A norm overflows float32 above ~1.8e19, so a finite gradient or
    parameter tree of such a norm counts as diverged too.
    """
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm) & all_finite(state.batch_stats)
    if check_ema:
        finite = finite & jnp.isfinite(optax.tree.norm(state.ema_params))
    return finite


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
