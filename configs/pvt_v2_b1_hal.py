r"""PVTv2-b1 with hMHSA + cFFN (pvt_v2_b1_hal): configs/pvt_v2_b1.py's recipe, the hal model.

Same arguments as configs/pvt_v2_b1.py (``runlocal``, ``data=demo``, ``data_dir=DIR``).

  python train.py --config configs/pvt_v2_b1_hal.py --workdir runs/pvt_v2_b1_hal
  python train.py --config configs/pvt_v2_b1_hal.py:runlocal,data=demo --workdir /tmp/smoke   # smoke run
"""

from halluvit_jax import config_helpers as ch


def get_config(arg=None):
    c = ch.load_config("pvt_v2_b1.py", arg, relative_to=__file__)
    c.model_name = "pvt_v2_b1_hal"  # even head counts per stage (half real, half hallucinated)
    # halluvit_jax.HalConfig's fields, at their defaults (docs/design.md sections 2-3).
    c.model.hal = dict(variant="ihh_chh", hal_init="identity", cffn=True, compact_ratio=2 / 3,
                       num_branches=2, factorize="w2", round_to=1, deploy=False)
    return c
