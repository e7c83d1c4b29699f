r"""The paper's ablations on the embedded demo (configs/demo.py's model and recipe).

``ablation=NAME`` picks one change of the default HalConfig from
``halluvit_jax.analysis.ablations.ABLATIONS`` (baseline, ihh_chh, copy, ihh, chh, chh_ihh, t1_2,
t3_4, plain_ffn, r1, r3, w1); ``seed=S`` the seed (init, dropout and data order); ``epochs=E``
the schedule (default 60, as the demo); ``data_dir=DIR``.

  python train.py --config configs/ablations/demo.py:ablation=chh,seed=1 --workdir runs/abl/chh_s1
  python scripts/run_ablations.py --epochs 20 --seeds 0,1,2     # the whole grid, see docs/ablations.md
"""

from halluvit_jax import config_helpers as ch
from halluvit_jax.analysis.ablations import ablate


def get_config(arg=None):
    a = ch.parse_arg(arg, ablation="ihh_chh", seed=0, epochs=60.0, data_dir="")
    c = ch.load_config("../demo.py", f"data_dir={a.data_dir}" if a.data_dir else None, relative_to=__file__)
    ablate(c, a.ablation)  # c.model.hal = dataclasses.replace(HalConfig(), **ABLATIONS[name])
    c.seed = a.seed
    c.total_epochs = float(a.epochs)
    c.eval_every_epochs = float(a.epochs)  # one evaluation, at the end
    c.checkpoint_every_epochs = float(a.epochs)
    c.keep_checkpoints = 1
    c.tensorboard = False
    return c
