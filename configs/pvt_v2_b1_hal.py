r"""pvt_v2_b1_hal on ImageNet-1k: PVTv2-b1 with hMHSA + cFFN, trained with its paper's recipe.

See `halluvit_jax.train.config_lib.pvt_v2_recipe` for the exact recipe and its source; the hMHSA/cFFN
paper trains its variants with the recipe of the backbone.

  python train.py --config configs/pvt_v2_b1_hal.py --workdir runs/pvt_v2_b1_hal
  python train.py --config configs/pvt_v2_b1_hal.py:runlocal,data=demo --workdir /tmp/smoke   # smoke run
"""

from halluvit_jax.train import config_lib


def get_config(arg=None):
    return config_lib.preset(
        "pvt_v2_b1_hal", arg, recipe=config_lib.pvt_v2_recipe, runlocal_model={"depths": (1, 1, 1, 1)}
    )
