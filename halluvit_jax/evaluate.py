r"""Evaluate any checkpoint (top-1 / top-5 / loss on the eval split of a config).

  python -m halluvit_jax.evaluate --checkpoint runs/demo                  # the workdir's config.json
  python -m halluvit_jax.evaluate --checkpoint runs/demo --deploy --config.input.data_dir=DIR
  python -m halluvit_jax.evaluate --config configs/deit_s_hal.py --checkpoint converted/deit_s_hal

``--checkpoint`` is a training workdir, its ``checkpoints/`` directory or one step directory
(``--ema`` picks the EMA weights, ``--deploy`` folds cFFN into its deploy form first), or a
converted/exported directory with a ``model_card.json``; everything is read by
:func:`halluvit_jax.load`, which verifies that the variables fit the model exactly.
``--config`` defaults to the workdir's ``config.json``; ``--config.FIELD=VALUE`` overrides apply
either way. The model comes from the model card when there is one, else from the config; the
input pipeline always from the config. ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import types

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from halluvit_jax import cli, loading
from halluvit_jax.checkpoint import io
from halluvit_jax.data import demo, pipeline
from halluvit_jax.train import sharding, steps
from halluvit_jax.train.evaluation import evaluate_dataset

logger = logging.getLogger("halluvit_jax.evaluate")


def load_for_eval(config: ml_collections.ConfigDict, checkpoint: str, *, step: int | None = None,
                  use_ema: bool = False, deploy: bool = False) -> loading.Loaded:
    """The checkpoint as :class:`~halluvit_jax.loading.Loaded`: a training checkpoint is built
    as ``config`` says (``model_name`` + ``model`` fields, which must fit it), a converted one as
    its model card says."""
    dtype = {"dtype": steps.compute_dtype(config)}
    if io.is_converted(checkpoint):
        loaded = loading.load(checkpoint, ema=use_ema, overrides=dtype, deploy=deploy)
        if config.get("model_name") and loaded.name != config.model_name:
            logger.warning("Model card says %s, config says %s: using the card.", loaded.name, config.model_name)
        return loaded
    fields = {**dict(config.get("model") or {}), **dtype}
    loaded = loading.load(checkpoint, ema=use_ema, step=step, model=config.model_name, overrides=fields, deploy=deploy)
    logger.info("Loaded step %d of %s.", loaded.step, loaded.path)
    return loaded


def evaluate_loaded(config: ml_collections.ConfigDict, loaded: loading.Loaded, *,
                    batch_size: int | None = None) -> dict[str, float]:
    """Top-1 / top-5 / loss of a loaded model on ``config.input.eval_split``, data parallel on all
    devices, through the trainer's own evaluation loop (:func:`~halluvit_jax.train.evaluation.evaluate_dataset`)."""
    input_cfg = config.input
    if config.get("prepare_demo", False):
        demo.prepare_if_missing(input_cfg)
    input_cfg = pipeline.fit_splits(input_cfg)
    num_classes = int(pipeline.num_classes(input_cfg))
    if loaded.input.num_classes != num_classes:
        raise cli.UserError(f"the checkpoint classifies {loaded.input.num_classes} classes, {input_cfg.dataset} "
                            f"has {num_classes}; evaluate it on its own dataset (--config / --config.input.dataset)")
    mesh = sharding.create_mesh({"data": -1, "fsdp": 1, "model": 1})
    batch_size = int(batch_size or config.global_batch_size)
    dp = sharding.data_parallel_size(mesh)
    batch_size = max(dp, batch_size // dp * dp)
    repl = sharding.replicated(mesh)
    params = jax.device_put(loaded.variables["params"], repl)
    batch_stats = jax.device_put(loaded.variables.get("batch_stats", {}), repl)
    step_fn = jax.jit(
        functools.partial(steps.eval_step, apply_fn=loaded.model.apply, mean_std=steps.mean_std_of(input_cfg)),
        out_shardings=repl,
    )
    return evaluate_dataset(step_fn, params, batch_stats, input_cfg, global_batch_size=batch_size, mesh=mesh)


def _workdir_config(checkpoint: str) -> ml_collections.ConfigDict:
    """The ``config.json`` of the training workdir holding ``checkpoint``."""
    if not os.path.exists(checkpoint):
        raise loading.CheckpointNotFoundError(
            f"checkpoint {checkpoint!r} does not exist; pass a training workdir (train.py --workdir) or a "
            "converted directory with --config")
    root, _ = io.checkpoint_root(checkpoint)
    for cand in (os.path.dirname(root), root, os.path.abspath(checkpoint)):
        path = os.path.join(cand, io.CONFIG_NAME)
        if os.path.isfile(path):
            with open(path) as f:
                return ml_collections.ConfigDict(json.load(f), type_safe=False)
    raise cli.UsageError(f"no config.json found for {checkpoint}; pass --config configs/NAME.py (the config "
                         "whose input pipeline to evaluate on)")


def _apply_overrides(config: ml_collections.ConfigDict, argv: list[str]) -> None:
    """``--config.FIELD=VALUE`` (VALUE read by :func:`~halluvit_jax.cli.parse_value`) onto a JSON config."""
    cli.check_config_overrides(config, argv)
    for field, arg in cli.override_args(argv):
        _, sep, raw = arg.partition("=")
        if not sep:
            raise cli.UsageError(f"{arg}: write --config.{field}=VALUE")
        value = cli.parse_value(raw)
        node = config
        *parents, last = field.split(".")
        for p in parents:
            node = node[p]
        node[last] = value


def _define(fv, argv, *, with_config: bool):
    ns = types.SimpleNamespace(config=None)
    if with_config:
        ns.config = config_flags.DEFINE_config_file(
            "config", None, "Config file (configs/*.py[:args]); default: the workdir's config.json.",
            flag_values=fv, sys_argv=argv)
    ns.checkpoint = flags.DEFINE_string("checkpoint", None, "Workdir, checkpoint dir or converted checkpoint.",
                                        flag_values=fv)
    ns.step = flags.DEFINE_integer("step", None, "Training checkpoint step (default: latest).", flag_values=fv)
    ns.ema = flags.DEFINE_bool("ema", False, "Evaluate the EMA weights of a training checkpoint.", flag_values=fv)
    ns.deploy = flags.DEFINE_bool("deploy", False, "Fold cFFN into its deploy form before evaluating.",
                                  flag_values=fv)
    ns.batch_size = flags.DEFINE_integer("batch_size", None, "Eval batch size (default: config.global_batch_size).",
                                         flag_values=fv)
    ns.output = flags.DEFINE_string("output", None, "Also write the results as JSON to this file.", flag_values=fv)
    return ns


def run(argv: list[str]) -> int:
    """``main`` without the error handling (see :func:`main`)."""
    if any(a in ("--help", "-h", "--helpfull") for a in argv):
        print(__doc__.strip())
        return 0
    with_config = cli.config_path_arg(argv) is not None
    absl_argv = argv if with_config else [a for a in argv if not cli.override_args([a])]
    handles = cli.parse_absl_flags(absl_argv, functools.partial(_define, with_config=with_config),
                                   prog="python -m halluvit_jax.evaluate")
    if not handles.checkpoint.value:
        raise cli.UsageError("--checkpoint is required: a training workdir or a converted directory")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s] %(message)s",
                        stream=sys.stderr)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax/tfds warnings repeat our own lines
    checkpoint = handles.checkpoint.value
    if with_config:
        config = handles.config.value
    else:
        config = _workdir_config(checkpoint)
        _apply_overrides(config, argv)
    loaded = load_for_eval(config, checkpoint, step=handles.step.value, use_ema=handles.ema.value,
                           deploy=handles.deploy.value)
    results = evaluate_loaded(config, loaded, batch_size=handles.batch_size.value)
    results = {"model": loaded.name, "deploy": loaded.deploy, "checkpoint": os.path.abspath(checkpoint),
               **({"step": loaded.step} if loaded.step is not None else {}), **results}
    print(json.dumps(results, indent=2))
    if handles.output.value:
        with open(handles.output.value, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m halluvit_jax.evaluate``: exit 0, 1 (one ``error:`` line) or 2 (usage)."""
    return cli.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
