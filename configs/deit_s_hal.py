r"""DeiT-S with hMHSA + cFFN (deit_small_hal): configs/deit_s.py's recipe, the hal model.

Same arguments as configs/deit_s.py (``runlocal``, ``data=demo``, ``data_dir=DIR``).

  python train.py --config configs/deit_s_hal.py --workdir runs/deit_s_hal
  python train.py --config configs/deit_s_hal.py:runlocal,data=demo --workdir /tmp/smoke   # smoke run
"""

from halluvit_jax import config_helpers as ch


def get_config(arg=None):
    c = ch.load_config("deit_s.py", arg, relative_to=__file__)
    c.model_name = "deit_small_hal"  # 6 heads: 3 real + 3 hallucinated
    # halluvit_jax.HalConfig's fields, at their defaults (docs/design.md sections 2-3).
    c.model.hal = dict(variant="ihh_chh", hal_init="identity", cffn=True, compact_ratio=2 / 3,
                       num_branches=2, factorize="w2", round_to=1, deploy=False)
    return c
