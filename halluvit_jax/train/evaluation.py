"""The one evaluation loop: of the trainer (every ``eval_every`` steps) and of
``python -m halluvit_jax.evaluate``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from halluvit_jax.cli import UserError
from halluvit_jax.data import pipeline
from halluvit_jax.train import sharding


def evaluate_dataset(step_fn: Callable, params: Any, batch_stats: Any, input_cfg: ml_collections.ConfigDict, *,
                     global_batch_size: int, mesh) -> dict[str, float]:
    """Top-1 / top-5 / loss (means over the real examples) and count of ``input_cfg.eval_split``.

    ``step_fn(params, batch_stats, batch)`` is a jitted :func:`~halluvit_jax.train.steps.eval_step`;
    the batches are sharded over ``mesh``.
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


def evaluate_state(step_fn: Callable, state: Any, input_cfg: ml_collections.ConfigDict, *, global_batch_size: int,
                   mesh, ema: bool) -> dict[str, float]:
    """``{'eval/top1', 'eval/top5', 'eval/loss'}`` of a train state's parameters, and with ``ema``
    the same of its EMA parameters as ``eval/ema_*``."""
    results = {}
    variants = [("", state.params)] + ([("ema_", state.ema_params)] if ema else [])
    for prefix, params in variants:
        res = evaluate_dataset(step_fn, params, state.batch_stats, input_cfg, global_batch_size=global_batch_size,
                               mesh=mesh)
        results.update({f"eval/{prefix}{k}": res[k] for k in ("top1", "top5", "loss")})
    return results
