"""Optimizer pieces: learning-rate schedule, weight-decay mask, AdamW chain, EMA."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from halluvit_jax.layers.config import NO_DECAY_REGEX as DEFAULT_NO_DECAY_REGEX
from halluvit_jax.train.sharding import path_str


def create_learning_rate_fn(
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_init_lr: float = 0.0,
    min_lr: float = 0.0,
    schedule: str = "cosine",
) -> optax.Schedule:
    """Linear warm-up from ``warmup_init_lr`` to ``base_lr``, then cosine (or linear/constant) to ``min_lr``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}.")
    warmup_steps = min(int(warmup_steps), total_steps)
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "cosine":
        alpha = (min_lr / base_lr) if base_lr else 0.0
        main = optax.cosine_decay_schedule(base_lr, decay_steps, alpha=alpha)
    elif schedule == "linear":
        main = optax.linear_schedule(base_lr, min_lr, decay_steps)
    elif schedule == "constant":
        main = optax.constant_schedule(base_lr)
    else:
        raise ValueError(f"Unknown schedule {schedule!r}; use 'cosine', 'linear' or 'constant'.")
    if warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(warmup_init_lr, base_lr, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


def learning_rate_fn_of(optim_cfg: Any, batch_size: int, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """:func:`create_learning_rate_fn` of a config's ``optim`` section: ``optim.lr`` is the rate at
    ``optim.lr_base_batch_size`` and scales linearly with the global ``batch_size``."""
    base_batch = float(optim_cfg.get("lr_base_batch_size", batch_size) or batch_size)
    return create_learning_rate_fn(
        base_lr=float(optim_cfg.lr) * batch_size / base_batch, total_steps=total_steps, warmup_steps=warmup_steps,
        warmup_init_lr=float(optim_cfg.get("warmup_init_lr", 0.0)), min_lr=float(optim_cfg.get("min_lr", 0.0)),
        schedule=optim_cfg.get("schedule", "cosine"),
    )


def weight_decay_mask(params: Any, no_decay_regex: str = DEFAULT_NO_DECAY_REGEX) -> Any:
    """True where weight decay applies: not on 0/1-d leaves (norms, biases) nor on ``no_decay_regex``."""
    pattern = re.compile(no_decay_regex) if no_decay_regex else None

    def decay(path, leaf):
        if jnp.ndim(leaf) <= 1:
            return False
        return not (pattern and pattern.search(path_str(path)))

    return jax.tree_util.tree_map_with_path(decay, params)


def create_optimizer(optim_config: Any, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
    """AdamW (or SGD-momentum) with masked decoupled weight decay and optional global-norm clipping."""
    name = optim_config.get("name", "adamw")
    mask: Callable[[Any], Any] = lambda p: weight_decay_mask(
        p, optim_config.get("no_decay_regex", DEFAULT_NO_DECAY_REGEX)
    )
    if name == "adamw":
        opt = optax.adamw(
            learning_rate_fn,
            b1=optim_config.get("b1", 0.9),
            b2=optim_config.get("b2", 0.999),
            eps=optim_config.get("eps", 1e-8),
            weight_decay=optim_config.get("weight_decay", 0.05),
            mask=mask,
        )
    elif name == "sgd":
        opt = optax.chain(
            optax.add_decayed_weights(optim_config.get("weight_decay", 0.0), mask=mask),
            optax.sgd(learning_rate_fn, momentum=optim_config.get("momentum", 0.9), nesterov=True),
        )
    else:
        raise ValueError(f"Unknown optimizer {name!r}; use 'adamw' or 'sgd'.")
    clip = optim_config.get("grad_clip_norm", None)
    if clip:
        opt = optax.chain(optax.clip_by_global_norm(float(clip)), opt)
    return opt


def ema_update(ema_params: Any, params: Any, decay: float) -> Any:
    """Exponential moving average of the weights: ``ema <- decay * ema + (1 - decay) * params``."""
    return jax.tree_util.tree_map(lambda e, p: e * decay + p.astype(e.dtype) * (1.0 - decay), ema_params, params)
