r"""Train a model: ``python train.py --config configs/demo.py --workdir runs/demo``.

``--config configs/X.py[:args]`` picks a preset (``configs/``), ``--config.field=value``
overrides one field (e.g. ``--config.total_steps=100``), ``--workdir`` holds checkpoints,
metrics (JSON lines + TensorBoard) and the config. Re-running the same command resumes.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:args]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    # Our progress lines go to stdout; orbax/grain/tfds (absl, stderr) only warn.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s] %(message)s"))
    ours = logging.getLogger("halluvit_jax")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    logging.getLogger("absl").setLevel(logging.WARNING)
    from halluvit_jax.train import train_and_evaluate

    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
