r"""Next-ViT-S with hMHSA + cFFN (nextvit_small_hal): configs/nextvit_s.py's recipe, the hal model.

Same arguments as configs/nextvit_s.py (``runlocal``, ``data=demo``, ``data_dir=DIR``).

  python train.py --config configs/nextvit_s_hal.py --workdir runs/nextvit_s_hal
  python train.py --config configs/nextvit_s_hal.py:runlocal,data=demo --workdir /tmp/smoke   # smoke run
"""

from halluvit_jax import config_helpers as ch


def get_config(arg=None):
    c = ch.load_config("nextvit_s.py", arg, relative_to=__file__)
    c.model_name = "nextvit_small_hal"
    # halluvit_jax.HalConfig's fields, at their defaults (docs/design.md sections 2-3).
    c.model.hal = dict(variant="ihh_chh", hal_init="identity", cffn=True, compact_ratio=2 / 3,
                       num_branches=2, factorize="w2", round_to=1, deploy=False)
    return c
