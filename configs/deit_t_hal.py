r"""DeiT-T with hMHSA + cFFN (deit_tiny_hal): configs/deit_t.py's recipe, the hal model.

Same arguments as configs/deit_s.py (``runlocal``, ``data=demo``, ``data_dir=DIR``).

  python train.py --config configs/deit_t_hal.py --workdir runs/deit_t_hal
  python train.py --config configs/deit_t_hal.py:runlocal,data=demo --workdir /tmp/smoke   # smoke run
"""

from halluvit_jax import config_helpers as ch


def get_config(arg=None):
    c = ch.load_config("deit_t.py", arg, relative_to=__file__)
    c.model_name = "deit_tiny_hal"  # DeiT-T with 4 heads (2 real + 2 hallucinated)
    # halluvit_jax.HalConfig's fields, at their defaults (docs/design.md sections 2-3).
    c.model.hal = dict(variant="ihh_chh", hal_init="identity", cffn=True, compact_ratio=2 / 3,
                       num_branches=2, factorize="w2", round_to=1, deploy=False)
    return c
