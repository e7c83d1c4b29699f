r"""The paper's ablations on the embedded demo (configs/demo.py's model and recipe).

``ablation=NAME`` picks one setting of :data:`halluvit_jax.analysis.ablations.ABLATIONS`
(baseline, ihh_chh, copy, ihh, chh, chh_ihh, t1_2, t3_4, plain_ffn, r1, r3, w1); ``seed=S``
the seed (init, dropout and data order); ``epochs=E`` the schedule (default 60, as the demo).

  python train.py --config configs/ablations/demo.py:ablation=chh,seed=1 --workdir runs/abl/chh_s1
  python scripts/run_ablations.py --epochs 20 --seeds 0,1,2     # the whole grid, see docs/ablations.md
"""

import importlib.util
import os

from halluvit_jax.analysis.ablations import ablation_model
from halluvit_jax.train import config_lib


def _demo_preset():
    """configs/demo.py, loaded by path (config files are not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "demo.py")
    spec = importlib.util.spec_from_file_location("_halluvit_demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    a = config_lib.parse_arg(arg, ablation="ihh_chh", seed=0, epochs=60.0, data_dir="")
    c = _demo_preset().get_config(f"data_dir={a.data_dir}" if a.data_dir else None)
    name, model = ablation_model(c.model_name, c.model.to_dict(), a.ablation)
    c.model_name = name
    c.model = model
    c.seed = a.seed
    c.total_epochs = float(a.epochs)
    c.eval_every_epochs = float(a.epochs)  # one evaluation, at the end
    c.checkpoint_every_epochs = float(a.epochs)
    c.keep_checkpoints = 1
    c.tensorboard = False
    return c
