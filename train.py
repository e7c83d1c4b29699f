r"""Train a model: ``python train.py --config configs/demo.py --workdir runs/demo``.

``--config configs/X.py[:args]`` picks a preset (``configs/``), ``--config.field=value``
overrides one field (e.g. ``--config.total_steps=100``), ``--workdir`` holds checkpoints,
metrics (JSON lines + TensorBoard) and the config. Re-running the same command resumes.
``--debug`` (or ``HALLUVIT_DEBUG=1``) shows tracebacks; ``--help`` lists presets and fields.

Exit status: 0 done (or SIGTERM: checkpoint saved), 1 runtime error (one ``error:`` line, e.g. a
non-finite step), 2 usage error (bad flag, config file or field), 130 Ctrl-C (checkpoint saved).
"""

import logging
import os
import sys
import types

REPO = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(REPO, "configs")

MAIN_FIELDS = (
    "model_name", "model", "global_batch_size", "total_steps", "total_epochs", "optim.lr", "optim.weight_decay",
    "optim.warmup_epochs", "optim.grad_clip_norm", "ema_decay", "compute_dtype", "input.dataset", "input.data_dir",
    "input.image_size", "mesh", "seed", "log_every_steps", "eval_every_epochs", "checkpoint_every_steps",
    "keep_checkpoints", "init_from",
)


def usage() -> str:
    from halluvit_jax import cli, config_helpers

    base = config_helpers.base_config()
    lines = [__doc__.strip(), "", "Flags:",
             "  --config FILE[:ARGS]   preset (required); ARGS e.g. runlocal,data=demo (smoke run of any preset)",
             "  --config.FIELD=VALUE   override a field (repeatable)",
             "  --workdir DIR          checkpoints, metrics.jsonl, config.json (required)",
             "  --debug                tracebacks instead of one-line errors",
             "", "Presets (configs/):"]
    lines += [f"  {p}" for p in cli.available_configs(CONFIGS)]
    lines += ["", "Main fields (defaults of the base config; each preset sets its own recipe):"]
    for field in MAIN_FIELDS:
        node = base
        for part in field.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        value = dict(node) if hasattr(node, "items") else node
        lines.append(f"  {field:<24} {value!r}")
    lines.append("Every field: `python -c \"import ml_collections; ...\"` or the preset file and "
                 "halluvit_jax/config_helpers.py.")
    return "\n".join(lines)


def _define(fv, argv):
    from absl import flags
    from ml_collections import config_flags

    ns = types.SimpleNamespace()
    ns.config = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:args]).",
                                                flag_values=fv, sys_argv=argv)
    ns.workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config.",
                                     flag_values=fv)
    return ns


def main(argv):
    from halluvit_jax import cli

    if any(a in ("--help", "-h", "--helpfull", "-help") for a in argv):
        print(usage())
        return 0
    handles = cli.parse_absl_flags(argv, _define, configs_dir=CONFIGS, prog="train.py")
    if handles.config.value is None:
        raise cli.UsageError("--config is required, e.g. --config configs/demo.py (see train.py --help)")
    if not handles.workdir.value:
        raise cli.UsageError("--workdir is required, e.g. --workdir runs/demo (see train.py --help)")
    # Our progress lines go to stdout; orbax/grain/tfds (absl, stderr) only warn.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s] %(message)s"))
    ours = logging.getLogger("halluvit_jax")
    ours.addHandler(handler)
    ours.setLevel(logging.DEBUG if cli.debug_requested(sys.argv[1:]) else logging.INFO)
    ours.propagate = False
    # orbax/grain/tfds log through absl: their warnings repeat what our own lines say.
    logging.getLogger("absl").setLevel(logging.WARNING if cli.debug_requested(sys.argv[1:]) else logging.ERROR)
    try:
        from halluvit_jax.train.trainer import train_and_evaluate

        train_and_evaluate(handles.config.value, handles.workdir.value)
    finally:
        ours.removeHandler(handler)
    return 0


if __name__ == "__main__":
    from halluvit_jax.cli import run_main

    sys.exit(run_main(main))
