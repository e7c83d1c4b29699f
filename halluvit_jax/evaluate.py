r"""Evaluate any checkpoint (top-1 / top-5 / loss on the eval split of a config).

  python -m halluvit_jax.evaluate --config configs/demo.py --checkpoint runs/demo
  python -m halluvit_jax.evaluate --config configs/demo.py --checkpoint runs/demo --deploy
  python -m halluvit_jax.evaluate --config configs/deit_s_hal.py --checkpoint converted/deit_s_hal

``--checkpoint`` is a training workdir, its ``checkpoints/`` directory or one step directory
(training form: ``params`` + ``batch_stats``; ``--ema`` picks the EMA weights, ``--deploy``
folds cFFN into its deploy form first), or a converted/exported checkpoint directory with a
``model_card.json`` (loaded by :func:`halluvit_jax.convert.io.load_variables`; a model without
cFFN training branches is built with ``deploy=True``). The model architecture comes from the
model card when there is one, else from the config; the input pipeline always from the config.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import jax
import ml_collections

logger = logging.getLogger("halluvit_jax.evaluate")


def _has_training_branches(params: Any) -> bool:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return any("branch_kernel" in jax.tree_util.keystr(p) for p, _ in flat)


def load_for_eval(config: ml_collections.ConfigDict, checkpoint: str, *, step: int | None = None,
                  use_ema: bool = False, deploy: bool = False):
    """(model_name, model overrides, variables, deploy) for a checkpoint of either form."""
    from halluvit_jax.train import checkpointing

    name = config.model_name
    overrides = dict(config.get("model", {}) or {})
    if checkpointing.is_converted_checkpoint(checkpoint):
        from halluvit_jax.convert.io import load_variables

        variables, card = load_variables(checkpoint)
        if card.get("model"):
            if card["model"] != name:
                logger.warning("Model card says %s, config says %s: using the card.", card["model"], name)
            name = card["model"]
            overrides = dict(card.get("overrides", {}) or {})
        variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
        is_deploy = not _has_training_branches(variables["params"])
        if deploy and not is_deploy:
            from halluvit_jax.reparam import reparameterize

            variables, is_deploy = dict(reparameterize(variables)), True
        return name, overrides, variables, is_deploy
    root, step = checkpointing.find_checkpoint(checkpoint, step)
    state = checkpointing.load_state_as_numpy(root, step)
    variables = checkpointing.state_variables(state, use_ema=use_ema, where=f"{root}/{step}")
    logger.info("Loaded step %d of %s.", step, root)
    if deploy:
        from halluvit_jax.reparam import reparameterize

        variables = dict(reparameterize(variables))
    return name, overrides, variables, deploy


def evaluate_variables(config: ml_collections.ConfigDict, name: str, overrides: dict[str, Any],
                       variables: dict[str, Any], *, deploy: bool, batch_size: int | None = None) -> dict[str, float]:
    """Top-1 / top-5 / loss of ``variables`` on ``config.input.eval_split``, data parallel on all devices."""
    import functools

    import halluvit_jax as hv
    from halluvit_jax.data import pipeline
    from halluvit_jax.train import sharding, trainer

    input_cfg = config.input
    if config.get("prepare_demo", False):
        trainer._prepare_demo(input_cfg)
    num_classes = int(pipeline.num_classes(input_cfg))
    overrides = dict(overrides)
    overrides.update(num_classes=num_classes, dtype=trainer.compute_dtype(config))
    if deploy:
        overrides["deploy"] = True
    model = hv.create_model(name, **overrides)
    mesh = sharding.create_mesh({"data": -1, "fsdp": 1, "model": 1})
    batch_size = int(batch_size or config.global_batch_size)
    dp = sharding.data_parallel_size(mesh)
    batch_size = max(dp, batch_size // dp * dp)
    repl = sharding.replicated(mesh)
    params = jax.device_put(variables["params"], repl)
    batch_stats = jax.device_put(variables.get("batch_stats", {}), repl)
    step_fn = jax.jit(
        functools.partial(trainer.eval_step, apply_fn=model.apply, mean_std=trainer.mean_std_of(input_cfg)),
        out_shardings=repl,
    )
    totals = None
    for batch in pipeline.create_eval_iter(input_cfg, global_batch_size=batch_size):
        out = step_fn(params, batch_stats, sharding.shard_batch(batch, mesh))
        totals = out if totals is None else jax.tree_util.tree_map(lambda a, b: a + b, totals, out)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {
        "top1": float(totals["top1"]) / count,
        "top5": float(totals["top5"]) / count,
        "loss": float(totals["loss"]) / count,
        "count": count,
    }


def main(argv=None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).")
    ckpt_flag = flags.DEFINE_string("checkpoint", None, "Workdir, checkpoint dir or converted checkpoint.")
    step_flag = flags.DEFINE_integer("step", None, "Training checkpoint step (default: latest).")
    ema_flag = flags.DEFINE_bool("ema", False, "Evaluate the EMA weights of a training checkpoint.")
    deploy_flag = flags.DEFINE_bool("deploy", False, "Fold cFFN into its deploy form before evaluating.")
    bs_flag = flags.DEFINE_integer("batch_size", None, "Eval batch size (default: config.global_batch_size).")
    out_flag = flags.DEFINE_string("output", None, "Also write the results as JSON to this file.")
    flags.mark_flags_as_required(["config", "checkpoint"])

    def run(argv):
        del argv
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s] %(message)s",
                            stream=sys.stderr)
        logging.getLogger("absl").setLevel(logging.WARNING)
        config = config_flag.value
        name, overrides, variables, deploy = load_for_eval(
            config, ckpt_flag.value, step=step_flag.value, use_ema=ema_flag.value, deploy=deploy_flag.value
        )
        results = evaluate_variables(config, name, overrides, variables, deploy=deploy, batch_size=bs_flag.value)
        results = {"model": name, "deploy": deploy, "checkpoint": os.path.abspath(ckpt_flag.value), **results}
        print(json.dumps(results, indent=2))
        if out_flag.value:
            with open(out_flag.value, "w") as f:
                json.dump(results, f, indent=2)

    app.run(run, argv=argv)


if __name__ == "__main__":
    main()
