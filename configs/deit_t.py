r"""DeiT-T (deit_tiny) on ImageNet-1k: configs/deit_s.py's recipe (Touvron et al. 2021) with the
tiny model (width 192, 3 heads). Same arguments as configs/deit_s.py.

  python train.py --config configs/deit_t.py --workdir runs/deit_t
  python train.py --config configs/deit_t.py:runlocal,data=demo --workdir /tmp/smoke   # smoke run
"""

from halluvit_jax import config_helpers as ch


def get_config(arg=None):
    c = ch.load_config("deit_s.py", arg, relative_to=__file__)
    c.model_name = "deit_tiny"
    return c
