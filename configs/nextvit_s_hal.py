r"""nextvit_small_hal on ImageNet-1k: Next-ViT-S with hMHSA + cFFN, trained with its paper's recipe.

See `halluvit_jax.train.config_lib.nextvit_recipe` for the exact recipe and its source; the hMHSA/cFFN
paper trains its variants with the recipe of the backbone.

  python train.py --config configs/nextvit_s_hal.py --workdir runs/nextvit_s_hal
  python train.py --config configs/nextvit_s_hal.py:runlocal,data=demo --workdir /tmp/smoke   # smoke run
"""

from halluvit_jax.train import config_lib


def get_config(arg=None):
    return config_lib.preset(
        "nextvit_small_hal", arg, recipe=config_lib.nextvit_recipe, runlocal_model={}
    )
